"""FASTA reading: the project's one reader lives in :mod:`esmc_client.fasta` (standard
library only; importing it loads neither grpc nor torch), re-exported here for the library,
the training code and the benchmarks."""

from esmc_client.fasta import FastaError, read_fasta

__all__ = ["FastaError", "read_fasta"]
