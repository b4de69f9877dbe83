"""esmc-serve gRPC server: dynamic batching, continuous-batching generation, metrics."""
