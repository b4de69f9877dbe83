"""The ``esmc`` command.

    esmc serve --model esmc-tiny --port 50051          # needs the [server] extra
    esmc info
    esmc embed proteins.fasta -o embeddings.npz --layer -1
    esmc logits MKTAYIAKQR --top 3
    esmc generate "MKT___LL__" --steps 8 --strategy entropy --stream

``--target`` defaults to ``$ESMC_TARGET``, else ``127.0.0.1:50051``. Embedding files hold
``ids`` (one per protein, in FASTA order) and ``embeddings`` (proteins, d), mean-pooled
over residues: ``.npz`` always, ``.h5`` with h5py, ``.parquet`` with pyarrow installed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np

from esmc_client import ray as ray_jobs
from esmc_client import score_cli
from esmc_client.channel import DEFAULT_TARGET
from esmc_client.client import ESMCClient
from esmc_client.fasta import read_fasta
from esmc_client.security import (
    TLS_CA_ENV,
    TLS_CERT_ENV,
    TLS_ENV,
    TLS_KEY_ENV,
    TOKEN_ENV,
    env_flag,
)
from esmc_client.types import EmbedResult, ESMCError, GenerationConfig, LogitsConfig

TARGET_ENV = "ESMC_TARGET"
EMBED_FORMATS = {".npz": None, ".h5": "h5py", ".hdf5": "h5py", ".parquet": "pyarrow"}
SERVER_EXTRA_HINT = "esmc serve needs the server extra: pip install 'esmc-serve[server]'"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "serve":
        return serve(argv[1:])
    parser = build_parser(os.environ.get(TARGET_ENV) or DEFAULT_TARGET)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.run(args)
    except ESMCError as error:
        print(f"esmc {args.command}: {error}", file=sys.stderr)
        return 1


def build_parser(default_target: str = DEFAULT_TARGET) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="esmc", description="ESMC over gRPC (esmc-serve).")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--target", default=default_target, help="server, host:port or dns:///...")
    common.add_argument("--timeout", type=float, default=None, help="deadline per call, seconds")
    add_security_flags(common)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("serve", help="run the server (all options: esmc serve --help)")

    info = sub.add_parser("info", parents=[common], help="describe the served model")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(run=cmd_info)

    embed = sub.add_parser("embed", parents=[common], help="mean embeddings of a FASTA file")
    embed.add_argument("fasta", type=Path)
    embed.add_argument("-o", "--output", type=_embed_output, required=True,
                       help="output file: .npz, .h5 (h5py) or .parquet (pyarrow)")
    embed.add_argument("--layer", type=int, default=-1,
                       help="-1 final embeddings, 0..n-1 a block's output, -2.. from the end")
    embed.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                       help="wire dtype (bfloat16 is stored as float32)")
    embed.add_argument("--batch-size", type=_positive, default=256, help="sequences per stream")
    embed.add_argument("--concurrency", type=_positive, default=4, help="streams at once")
    embed.add_argument("--max-in-flight", type=_positive, default=64,
                       help="requests ahead of their answers per stream")
    embed.add_argument("--progress", action=argparse.BooleanOptionalAction,
                       default=None, help="progress bar (default: when stderr is a terminal)")
    embed.set_defaults(run=cmd_embed)

    logits = sub.add_parser("logits", parents=[common], help="sequence logits of one protein")
    logits.add_argument("sequence")
    logits.add_argument("--top", type=_positive, default=3, help="tokens shown per position")
    logits.add_argument("-o", "--output", type=Path, help="write the (L+2, 64) logits as .npy")
    logits.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    logits.set_defaults(run=cmd_logits)

    gen = sub.add_parser("generate", parents=[common], help="fill the masked positions (_)")
    gen.add_argument("prompt", help='e.g. "MKT___LL__" (_ or <mask> for masked positions)')
    gen.add_argument("--steps", type=_positive, default=20, help="num_steps")
    gen.add_argument("--strategy", choices=("random", "entropy"), default="random")
    gen.add_argument("--schedule", choices=("cosine", "linear"), default="cosine")
    gen.add_argument("--temperature", type=float, default=1.0)
    gen.add_argument("--annealing", action=argparse.BooleanOptionalAction, default=True,
                     help="temperature annealing")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stream", action="store_true", help="print the sequence at every step")
    gen.set_defaults(run=cmd_generate)
    score_cli.register(sub, common)
    ray_jobs.add_parser(sub, common)
    return parser


# --- commands -----------------------------------------------------------------------------


def serve(argv: list[str]) -> int:
    """Run the server (``esmc_server.cli.main``), imported only now: it needs torch."""
    try:
        from esmc_server import cli as server_cli
    except ImportError as error:
        print(f"{SERVER_EXTRA_HINT} ({error})", file=sys.stderr)
        return 2
    return server_cli.main(argv) or 0


def cmd_info(args: argparse.Namespace) -> int:
    with connect(args) as client:
        info = asdict(client.info(timeout=args.timeout))
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    info["vocabulary"] = " ".join(info["vocabulary"])
    batching = info.pop("batching")
    for key, value in {**info, **{f"batching.{k}": v for k, v in batching.items()}}.items():
        print(f"{key}: {value}")
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    records = list(read_fasta(args.fasta))
    if not records:
        print(f"esmc embed: no sequences in {args.fasta}", file=sys.stderr)
        return 1
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    with connect(args) as client:
        results = client.embed(
            records,
            layer=args.layer,
            pool="mean",
            output_dtype=args.dtype,
            batch_size=args.batch_size,
            concurrency=args.concurrency,
            max_in_flight=args.max_in_flight,
            progress=progress,
            timeout=args.timeout,
        )
    good = [r for r in results if r.ok]
    for failed in (r for r in results if not r.ok):
        print(f"esmc embed: {failed.id}: {failed.error}", file=sys.stderr)
    if good:
        write_embeddings(args.output, good)
        print(f"wrote {len(good)} embeddings to {args.output}", file=sys.stderr)
    if len(good) < len(results):
        print(f"esmc embed: {len(results) - len(good)} of {len(results)} sequences failed",
              file=sys.stderr)
        return 1
    return 0


def cmd_logits(args: argparse.Namespace) -> int:
    with connect(args) as client:
        vocabulary = client.info(timeout=args.timeout).vocabulary
        tokens = client.encode(args.sequence, timeout=args.timeout)
        out = client.logits(tokens, LogitsConfig(sequence=True), output_dtype=args.dtype,
                            timeout=args.timeout)
    logits = out.logits.sequence  # (L+2, 64)
    print(f"logits {tuple(logits.shape)} {logits.dtype}")
    if args.output is not None:
        np.save(args.output, logits)
        print(f"wrote {args.output}", file=sys.stderr)
        return 0
    for line in top_tokens_lines(logits, tokens, vocabulary, args.top):
        print(line)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    config = GenerationConfig(
        schedule=args.schedule,
        strategy=args.strategy,
        num_steps=args.steps,
        temperature=args.temperature,
        temperature_annealing=args.annealing,
        top_p=args.top_p,
    )
    with connect(args) as client:
        steps = client.generate_stream(args.prompt, config, args.seed, timeout=args.timeout)
        for step in steps:
            if step.final:
                print(step.protein.sequence)
                return 0
            if args.stream:
                print(f"{step.step:>3}/{step.num_steps}  {step.sequence}", flush=True)
    print("esmc generate: the stream ended without a final message", file=sys.stderr)
    return 1


# --- helpers ------------------------------------------------------------------------------


def add_security_flags(parser: argparse.ArgumentParser, environ=os.environ) -> None:
    """``--token``, ``--tls``, ``--tls-ca/-cert/-key``, defaulting to ``ESMC_TOKEN``/``ESMC_TLS*``."""
    parser.add_argument("--token", default=environ.get(TOKEN_ENV),
                        help=f"bearer token sent with every call (default ${TOKEN_ENV})")
    parser.add_argument("--tls", action=argparse.BooleanOptionalAction,
                        default=env_flag(environ, TLS_ENV),
                        help=f"TLS channel (default ${TLS_ENV}, else on when a --tls-* file is given)")
    parser.add_argument("--tls-ca", default=environ.get(TLS_CA_ENV),
                        help=f"PEM CA of the server's certificate (default ${TLS_CA_ENV}; "
                        "none: the system's roots)")
    parser.add_argument("--tls-cert", default=environ.get(TLS_CERT_ENV),
                        help=f"PEM client certificate for mutual TLS (default ${TLS_CERT_ENV})")
    parser.add_argument("--tls-key", default=environ.get(TLS_KEY_ENV),
                        help=f"PEM key of --tls-cert (default ${TLS_KEY_ENV})")


def connect(args: argparse.Namespace) -> ESMCClient:
    """A client for ``--target`` with the token and TLS settings of ``args``."""
    try:
        return ESMCClient(args.target, token=args.token or None, tls=args.tls,
                          root_certificates=args.tls_ca, client_certificate=args.tls_cert,
                          client_key=args.tls_key)
    except ValueError as error:
        raise ESMCError("INVALID_ARGUMENT", str(error)) from None



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


def write_embeddings(path: Path, results: Sequence[EmbedResult]) -> None:
    """``ids`` and ``embeddings`` (proteins, d) in the format named by ``path``'s suffix."""
    ids = [r.id for r in results]
    matrix = np.stack([r.embedding for r in results])  # (N, d)
    suffix = path.suffix.lower()
    if suffix == ".npz":
        np.savez(path, ids=np.array(ids, dtype=str), embeddings=matrix)
    elif suffix in (".h5", ".hdf5"):
        import h5py

        with h5py.File(path, "w") as handle:
            handle.create_dataset("ids", data=ids, dtype=h5py.string_dtype())
            handle.create_dataset("embeddings", data=matrix)
    elif suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        column = pa.FixedSizeListArray.from_arrays(pa.array(matrix.ravel()), matrix.shape[1])
        pq.write_table(pa.table({"id": ids, "embedding": column}), path)
    else:
        raise ValueError(f"unknown embedding file type {suffix!r}")


def _embed_output(text: str) -> Path:
    path = Path(text)
    suffix = path.suffix.lower()
    if suffix not in EMBED_FORMATS:
        raise argparse.ArgumentTypeError(
            f"{text}: the output must end in {', '.join(EMBED_FORMATS)}"
        )
    module = EMBED_FORMATS[suffix]
    if module is not None and importlib.util.find_spec(module) is None:
        raise argparse.ArgumentTypeError(f"writing {suffix} needs {module} (pip install {module})")
    return path


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


if __name__ == "__main__":
    sys.exit(main())
