"""Test helpers, one module per job:

- ``models``: tiny random models, random proteins, reference models on the same weights,
  comparison helpers.
- ``checkpoints``: an ESMC's weights written in each published layout, like the hub repos.
- ``faults``: a model and pass steps that fail on a poison protein (fault injection).
- ``wire``: protobuf requests and wire tensors as numpy.
- ``metrics``: a server's Prometheus endpoint read back, and request counts from it.
- ``inprocess``: real servers in this process (port 0), on the test's loop or on a thread.
- ``processes``: real ``esmc serve`` processes on free ports.
- ``data``: the data files tests read (the proteome).
"""
