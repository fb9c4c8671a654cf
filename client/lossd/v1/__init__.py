"""Generated protobuf and gRPC code for lossd.v1 (do not edit; see scripts/gen_protos.py)."""
