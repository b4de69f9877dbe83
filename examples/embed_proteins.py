"""Embed every protein of a FASTA file (one mean embedding per protein) and save them.

    python examples/embed_proteins.py [FASTA] [OUT.npz]
"""

import os
import sys

import numpy as np

from esmc_client import ESMCClient
from esmc_client.fasta import read_fasta

fasta = sys.argv[1] if len(sys.argv) > 1 else "examples/proteins.fasta"
out = sys.argv[2] if len(sys.argv) > 2 else "runs/example_embeddings.npz"
records = list(read_fasta(fasta))
with ESMCClient(os.environ.get("ESMC_TARGET", "127.0.0.1:50051")) as client:
    results = client.embed(records, layer=-1, pool="mean")
failed = [r for r in results if not r.ok]
for result in failed:
    print(f"{result.id}: {result.error}", file=sys.stderr)
done = [r for r in results if r.ok]
os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
np.savez(out, ids=np.array([r.id for r in done]), embeddings=np.stack([r.embedding for r in done]))
print(f"{len(done)} of {len(records)} proteins embedded, {done[0].embedding.shape[0]} values each: {out}")
sys.exit(1 if failed else 0)
