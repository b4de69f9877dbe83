"""The wire contract of esmc-serve, shared by the client and the server.

- :mod:`esmc_proto.v1`: the generated protobuf and gRPC code of ``protos/esmc/v1/esmc.proto``
  (``python tools/gen_proto.py``; never edited by hand);
- :mod:`esmc_proto.status`: what a gRPC status means on the other fronts (the HTTP status of
  each code), the one table both sides use.

Nothing here imports torch, the model library, the client or the server.
"""
