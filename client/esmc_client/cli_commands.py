"""``esmc info``, ``esmc logits`` and ``esmc generate``: one call each to the served model.

    esmc info --json
    esmc logits MKTAYIAKQR --top 3
    esmc generate "MKT___LL__" --steps 8 --strategy entropy --stream
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np

from esmc_client.cli_options import (
    EXIT_OK,
    RunError,
    checked_sequence,
    connect,
    positive,
    server_info,
)
from esmc_client.types import GenerationConfig, LogitsConfig


def add_info_command(sub, common: argparse.ArgumentParser) -> None:
    info = sub.add_parser("info", parents=[common], help="describe the served model")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(run=cmd_info)


def add_logits_command(sub, common: argparse.ArgumentParser) -> None:
    logits = sub.add_parser("logits", parents=[common], help="sequence logits of one protein")
    logits.add_argument("sequence", help="one-letter sequence, e.g. MKTAYIAKQR")
    logits.add_argument("--top", type=positive, default=3, help="tokens shown per position")
    logits.add_argument("-o", "--output", type=Path, default=None,
                        help="write the (L+2, 64) logits as .npy instead of printing (default: print)")
    logits.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                        help="wire dtype")
    logits.add_argument("--uppercase", action="store_true", help="upper-case the sequence")
    logits.set_defaults(run=cmd_logits)


def add_generate_command(sub, common: argparse.ArgumentParser) -> None:
    gen = sub.add_parser(
        "generate", parents=[common], help="fill the masked positions (_)",
        description="Iterative unmasking. Steps are numbered 1..N (N = --steps, or the number "
        "of masked positions when that is smaller); --schedule decides how many positions "
        "each step fills (a step may fill none), and every position is filled by step N.",
    )
    gen.add_argument("prompt", help='e.g. "MKT___LL__" (_ or <mask> for masked positions)')
    gen.add_argument("--steps", type=positive, default=GenerationConfig.num_steps,
                     help="number of steps (at most the number of masked positions)")
    gen.add_argument("--strategy", choices=("random", "entropy"), default="random",
                     help="which masked positions each step fills")
    gen.add_argument("--schedule", choices=("cosine", "linear"), default="cosine",
                     help="how many positions each step fills")
    gen.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    gen.add_argument("--annealing", action=argparse.BooleanOptionalAction, default=True,
                     help="temperature annealing")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold")
    gen.add_argument("--seed", type=int, default=None,
                     help="seed: the same seed gives the same protein (default: random)")
    gen.add_argument("--stream", action="store_true",
                     help='print "step k/N  sequence" at every step, then the protein')
    gen.add_argument("--uppercase", action="store_true", help="upper-case the prompt")
    gen.set_defaults(run=cmd_generate)


def cmd_info(args: argparse.Namespace) -> int:
    with connect(args) as client:
        info = asdict(server_info(client, args))
    if args.json:
        print(json.dumps(info, indent=2))
        return EXIT_OK
    info["vocabulary"] = " ".join(info["vocabulary"])
    batching = info.pop("batching")
    for key, value in {**info, **{f"batching.{k}": v for k, v in batching.items()}}.items():
        print(f"{key}: {value}")
    return EXIT_OK


def cmd_logits(args: argparse.Namespace) -> int:
    sequence = checked_sequence(args.sequence, args.uppercase, "the sequence")
    with connect(args) as client:
        vocabulary = server_info(client, args).vocabulary
        tokens = client.encode(sequence, timeout=args.timeout)
        out = client.logits(tokens, LogitsConfig(sequence=True), output_dtype=args.dtype,
                            timeout=args.timeout)
    logits = out.logits.sequence  # (L+2, 64)
    print(f"logits {tuple(logits.shape)} {logits.dtype}")
    if args.output is not None:
        np.save(args.output, logits)
        print(f"wrote {args.output}", file=sys.stderr)
        return EXIT_OK
    for line in top_tokens_lines(logits, tokens, vocabulary, args.top):
        print(line)
    return EXIT_OK


def cmd_generate(args: argparse.Namespace) -> int:
    prompt = checked_sequence(args.prompt, args.uppercase, "the prompt")
    config = GenerationConfig(
        schedule=args.schedule,
        strategy=args.strategy,
        num_steps=args.steps,
        temperature=args.temperature,
        temperature_annealing=args.annealing,
        top_p=args.top_p,
    )
    with connect(args) as client:
        server_info(client, args)
        told = False
        for step in client.generate_stream(prompt, config, args.seed, timeout=args.timeout):
            if not told and step.num_steps < args.steps:
                print(f"esmc generate: --steps {args.steps} is more than the prompt's "
                      f"{step.num_steps} masked positions: running {step.num_steps} steps",
                      file=sys.stderr)
            told = True
            if step.final:
                print(step.protein.sequence)
                return EXIT_OK
            if args.stream:
                print(f"step {step.step}/{step.num_steps}  {step.sequence}", flush=True)
    raise RunError("the stream ended without a final message")


def top_tokens_lines(
    logits: np.ndarray, tokens: np.ndarray, vocabulary: Sequence[str], k: int
) -> list[str]:
    """One line per position: the input token, then the ``k`` likeliest tokens and their
    probabilities (softmax over all logits)."""
    scores = logits.astype(np.float64)
    probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    best = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
    lines = []
    for pos, (token, row) in enumerate(zip(tokens, best)):
        top = "  ".join(f"{_token_name(vocabulary, i)} {probs[pos, i]:.3f}" for i in row)
        lines.append(f"{pos:>5} {_token_name(vocabulary, token):>7}  {top}")
    return lines


def _token_name(vocabulary: Sequence[str], token_id) -> str:
    token_id = int(token_id)
    return vocabulary[token_id] if token_id < len(vocabulary) else f"<{token_id}>"
