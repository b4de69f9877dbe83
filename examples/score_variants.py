"""Score the variants of a ProteinGym-style CSV against a wild type (masked marginals).

    python examples/score_variants.py [WILD_TYPE.fasta] [VARIANTS.csv]
"""

import csv
import os
import sys

from esmc_client import ESMCClient
from esmc_client.fasta import read_fasta

fasta = sys.argv[1] if len(sys.argv) > 1 else "examples/thioredoxin.fasta"
table = sys.argv[2] if len(sys.argv) > 2 else "examples/thioredoxin_variants.csv"
(_, wild_type), *_ = read_fasta(fasta)
with open(table, newline="") as f:
    variants = [row["mutant"] for row in csv.DictReader(f)]
with ESMCClient(os.environ.get("ESMC_TARGET", "127.0.0.1:50051")) as client:
    scores = client.score_variants(wild_type, variants, method="masked-marginals")
for variant, score in sorted(zip(variants, scores), key=lambda pair: -pair[1]):
    print(f"{variant:>12}  {score:+.3f}")
