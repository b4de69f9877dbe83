"""Fill the masked positions of a prompt step by step, printing each step.

    python examples/generate.py [PROMPT] [STEPS]
"""

import os
import sys

from esmc_client import ESMCClient, GenerationConfig

prompt = sys.argv[1] if len(sys.argv) > 1 else "MSDKIIHLTDDSFDTDVLKADGAILVDFWAE____PCKMIAPILDEIA"
steps = int(sys.argv[2]) if len(sys.argv) > 2 else 4
config = GenerationConfig(num_steps=steps, strategy="entropy", temperature=1.0)
with ESMCClient(os.environ.get("ESMC_TARGET", "127.0.0.1:50051")) as client:
    for step in client.generate_stream(prompt, config, seed=1):
        print("final" if step.final else f"step {step.step}/{step.num_steps}", step.sequence)
