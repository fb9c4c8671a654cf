"""Generated protobuf and gRPC code for the KServe v2 ``inference`` package (do not edit; see
scripts/gen_protos.py).

It registers ``inference.*`` in protobuf's default descriptor pool, as tritonclient's own copy
does: do not import both in one process.
"""
