"""lossd's copy of the Open Inference Protocol (KServe v2) gRPC API (package ``inference``)."""
