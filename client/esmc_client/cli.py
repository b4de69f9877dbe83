"""The ``esmc`` command.

    esmc serve --model esmc-tiny --port 50051          # needs the [server] extra
    esmc info
    esmc embed proteins.fasta -o runs/embeddings.npz --layer -1
    esmc logits MKTAYIAKQR --top 3
    esmc generate "MKT___LL__" --steps 8 --strategy entropy --stream

``--target`` defaults to ``$ESMC_TARGET``, else ``127.0.0.1:50051``. Embedding files and
their keys are described in :mod:`esmc_client.outputs`.

Exit status: 0 when everything asked for was done; 1 when some proteins failed (each is
named in the summary, and in ``--errors FILE``); 2 when the run could not be done at all
(bad arguments or input, a server that cannot be reached, an option this model does not
have): reported once, as one line, before any per-protein work.

Each subcommand is registered by one function ``add_<name>_command(sub, common)``; other
modules add theirs the same way in :func:`build_parser`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from esmc_client import ray as ray_jobs
from esmc_client import score_cli
from esmc_client.channel import DEFAULT_TARGET
from esmc_client.client import ESMCClient
from esmc_client.fasta import FastaError, duplicate_ids, first_lowercase, read_fasta
from esmc_client.fasta import residue_count, truncate
from esmc_client.outputs import FORMATS, write_embeddings
from esmc_client.retry import RetryPolicy
from esmc_client.security import (
    TLS_CA_ENV,
    TLS_CERT_ENV,
    TLS_ENV,
    TLS_KEY_ENV,
    TOKEN_ENV,
    env_flag,
)
from esmc_client.types import EmbedResult, ESMCError, GenerationConfig, LogitsConfig, ServerInfo

TARGET_ENV = "ESMC_TARGET"
SERVER_EXTRA_HINT = "esmc serve needs the server extra: pip install 'esmc-serve[server]'"
EXIT_OK, EXIT_SOME_FAILED, EXIT_RUN_FAILED = 0, 1, 2
LONG_MODES = ("embed", "error", "truncate", "skip")
UPPERCASE_HINT = "ESMC reads upper-case one-letter codes; pass --uppercase to upper-case the input"
_LISTED = 10  # ids named per line of a summary
_RUN_CODES = ("UNAVAILABLE", "UNAUTHENTICATED", "PERMISSION_DENIED")  # about the server, not a protein


class RunError(Exception):
    """A failure of the whole run: one line on stderr, exit status 2."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default, unless the help already says it or the
    default is None (then the help says what "not given" means)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is None or "default" in text:
            return text
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose help shows defaults (subcommands get it too)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "serve":
        return serve(argv[1:])
    parser = build_parser(os.environ.get(TARGET_ENV) or DEFAULT_TARGET)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_RUN_FAILED
    try:
        return args.run(args)
    except (RunError, ESMCError) as error:
        print(f"esmc {args.command}: {error}", file=sys.stderr)
        return EXIT_RUN_FAILED
    except KeyboardInterrupt:
        print(f"esmc {args.command}: interrupted", file=sys.stderr)
        return 130


def build_parser(default_target: str = DEFAULT_TARGET) -> argparse.ArgumentParser:
    parser = Parser(
        prog="esmc",
        description="ESMC over gRPC (esmc-serve). Exit status: 0 done, 1 some proteins "
        "failed (listed), 2 the run could not be done (one line says why).",
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--target", default=default_target,
                        help=f"server, host:port or dns:///host:port (default ${TARGET_ENV}, "
                        f"else {DEFAULT_TARGET}; now {default_target})")
    common.add_argument("--timeout", type=float, default=None,
                        help="deadline per call in seconds (default: none)")
    add_security_flags(common)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.add_parser("serve", help="run the server (all options: esmc serve --help)")
    for add_command in (add_info_command, add_embed_command, add_logits_command,
                        add_generate_command, score_cli.register, ray_jobs.add_parser):
        add_command(sub, common)
    return parser


def add_info_command(sub, common: argparse.ArgumentParser) -> None:
    info = sub.add_parser("info", parents=[common], help="describe the served model")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(run=cmd_info)


def add_embed_command(sub, common: argparse.ArgumentParser) -> None:
    embed = sub.add_parser(
        "embed", parents=[common], help="embeddings of every protein of a FASTA file",
        description="Embed every protein of a FASTA file into one .npz, .h5 or .parquet file "
        "holding ids, embeddings and the run's metadata (model, layer, pooling, dtype, server "
        "version). A summary on stderr says what happened to each protein.",
    )
    embed.add_argument("fasta", type=Path, help="FASTA file (ids: each header's first word)")
    embed.add_argument("-o", "--output", type=_embed_output, required=True,
                       help="output file: .npz, .h5/.hdf5 (h5py) or .parquet (pyarrow)")
    embed.add_argument("--layer", type=int, default=-1,
                       help="-1: final embeddings (after the last norm); 0..n-1: that block's "
                       "output; -2..-n: counted from the end")
    embed.add_argument("--pool", choices=("mean", "none"), default="mean",
                       help="mean over residues (d per protein), or none: every position "
                       "(L+2 rows per protein, BOS and EOS included)")
    embed.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                       help="wire dtype (bfloat16 is stored as float32)")
    embed.add_argument("--long", choices=LONG_MODES, default="embed",
                       help="proteins longer than --max-residues: embed (send them; the server "
                       "embeds what it accepts and refuses the rest, listed), error (stop before "
                       "any work), truncate (embed the first --max-residues residues), skip")
    embed.add_argument("--max-residues", type=_positive, default=None,
                       help="length limit for --long (default: what the server accepts, from "
                       "esmc info; the model's trained context is 2046 residues)")
    embed.add_argument("--uppercase", action="store_true",
                       help="upper-case the sequences (lowercase is refused otherwise)")
    embed.add_argument("--dedupe", action="store_true",
                       help="keep the first record of a repeated id (repeats are refused otherwise)")
    embed.add_argument("--errors", type=Path, default=None,
                       help="write the proteins that failed or were skipped to this TSV file "
                       "(id, status, message) (default: none)")
    embed.add_argument("--batch-size", type=_positive, default=256, help="sequences per stream")
    embed.add_argument("--concurrency", type=_positive, default=4, help="streams at once")
    embed.add_argument("--max-in-flight", type=_positive, default=64,
                       help="requests ahead of their answers per stream")
    embed.add_argument("--ride-out-s", type=float, default=30.0,
                       help="seconds a restarting or unreachable server is waited for during "
                       "the run (0: fail its proteins at once)")
    embed.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                       help="progress bar (default: when stderr is a terminal)")
    embed.set_defaults(run=cmd_embed)


def add_logits_command(sub, common: argparse.ArgumentParser) -> None:
    logits = sub.add_parser("logits", parents=[common], help="sequence logits of one protein")
    logits.add_argument("sequence", help="one-letter sequence, e.g. MKTAYIAKQR")
    logits.add_argument("--top", type=_positive, default=3, help="tokens shown per position")
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
        "of masked positions when that is smaller: each step fills at least one).",
    )
    gen.add_argument("prompt", help='e.g. "MKT___LL__" (_ or <mask> for masked positions)')
    gen.add_argument("--steps", type=_positive, default=GenerationConfig.num_steps,
                     help="number of steps (at most one per masked position)")
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


# --- commands -----------------------------------------------------------------------------


def serve(argv: list[str]) -> int:
    """Run the server (``esmc_server.cli.main``), imported only now: it needs torch."""
    try:
        from esmc_server import cli as server_cli
    except ImportError as error:
        print(f"{SERVER_EXTRA_HINT} ({error})", file=sys.stderr)
        return EXIT_RUN_FAILED
    return server_cli.main(argv) or 0


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


@dataclass
class _Protein:
    id: str
    sequence: str
    truncated: bool = False


def cmd_embed(args: argparse.Namespace) -> int:
    proteins, dropped = read_proteins(args.fasta, args.uppercase, args.dedupe)
    prepare_output(args.output)
    if args.errors is not None:
        prepare_output(args.errors)
    retry = RetryPolicy(ride_out_s=args.ride_out_s)
    with connect(args, retry) as client:
        info = server_info(client, args)
        check_layer(args.layer, info)
        limit = args.max_residues or max(1, info.max_length - 2)
        proteins, skipped = apply_long(proteins, args.long, limit)
        progress = sys.stderr.isatty() if args.progress is None else args.progress
        results = client.embed(
            [(p.id, p.sequence) for p in proteins],
            layer=args.layer,
            pool=args.pool,
            output_dtype=args.dtype,
            batch_size=args.batch_size,
            concurrency=args.concurrency,
            max_in_flight=args.max_in_flight,
            progress=progress,
            timeout=args.timeout,
        )
    good = [(p, r) for p, r in zip(proteins, results) if r.ok]
    failed = [r for r in results if not r.ok]
    if failed and not good and len({(r.error.code, r.error.message) for r in failed}) == 1:
        if failed[0].error.code in _RUN_CODES:  # the server went away: one line says it
            raise RunError(f"no protein embedded: {failed[0].error}")
    if args.errors is not None:
        write_errors(args.errors, failed, skipped, limit)
    if good:
        metadata = {
            "model": info.model_name, "layer": args.layer, "pooling": args.pool,
            "dtype": args.dtype, "server_version": info.server_version,
            "d_model": info.d_model, "n_layers": info.n_layers, "max_residues": limit,
        }
        write_embeddings(args.output, [p.id for p, _ in good], [r.embedding for _, r in good],
                         metadata, [p.truncated for p, _ in good])
    for line in embed_summary(args, len(proteins) + len(skipped) + dropped, good, failed,
                              skipped, dropped, limit):
        print(line, file=sys.stderr)
    served = info.max_length - 2
    lengths = {p.id: residue_count(p.sequence) for p in proteins}
    over = [r.id for r in failed if lengths.get(r.id, 0) > served]
    if over:
        print(f"esmc embed: {len(over)} failed proteins are longer than the server's limit of "
              f"{served} residues: --long truncate or --long skip handles them", file=sys.stderr)
    return EXIT_SOME_FAILED if failed else EXIT_OK


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


# --- checks before any work ---------------------------------------------------------------


def read_proteins(path: Path, uppercase: bool, dedupe: bool) -> tuple[list[_Protein], int]:
    """The FASTA file's proteins, checked as a whole; ``(proteins, duplicates dropped)``."""
    try:
        records = list(read_fasta(path, uppercase=uppercase))
    except FastaError as error:
        raise RunError(str(error)) from None
    except (OSError, UnicodeDecodeError) as error:
        reason = getattr(error, "strerror", None) or str(error)
        raise RunError(f"cannot read {path}: {reason}") from None
    if not records:
        raise RunError(f"no sequences in {path} (a FASTA file starts with a '>' header)")
    repeated = duplicate_ids(records)
    dropped = 0
    if repeated and not dedupe:
        raise RunError(f"{len(repeated)} ids occur more than once in {path}: "
                       f"{_names(repeated)}; make them unique or pass --dedupe to keep the "
                       "first record of each")
    if repeated:
        seen: set[str] = set()
        unique = []
        for uid, sequence in records:
            if uid not in seen:
                seen.add(uid)
                unique.append((uid, sequence))
        dropped = len(records) - len(unique)
        records = unique
    lower = [(uid, hit) for uid, sequence in records if (hit := first_lowercase(sequence))]
    if lower:
        uid, (residue, letter) = lower[0]
        raise RunError(f"{len(lower)} sequences contain lowercase letters (first: {uid}, "
                       f"{letter!r} at residue {residue}); {UPPERCASE_HINT}")
    return [_Protein(uid, sequence) for uid, sequence in records], dropped


def checked_sequence(sequence: str, uppercase: bool, what: str) -> str:
    if uppercase:
        return sequence.upper().replace("<MASK>", "<mask>")
    if hit := first_lowercase(sequence):
        residue, letter = hit
        raise RunError(f"{what} contains lowercase letters ({letter!r} at residue {residue}); "
                       f"{UPPERCASE_HINT}")
    return sequence


def server_info(client: ESMCClient, args: argparse.Namespace) -> ServerInfo:
    """``Info``, or one line saying the server cannot be used."""
    try:
        return client.info(timeout=args.timeout if args.timeout is not None else 30)
    except ESMCError as error:
        raise RunError(f"cannot use the server at {args.target}: {error}") from None


def check_layer(layer: int, info: ServerInfo) -> None:
    n = info.n_layers
    if layer == -1 or 0 <= layer < n or -n <= layer <= -2:
        return
    raise RunError(f"--layer {layer} does not exist: {info.model_name} has {n} layers (-1: "
                   f"final embeddings; 0..{n - 1}: a block's output; -2..-{n}: from the end)")


def apply_long(
    proteins: list[_Protein], mode: str, limit: int
) -> tuple[list[_Protein], list[_Protein]]:
    """``(proteins to send, proteins skipped)`` under ``--long mode`` with ``limit`` residues."""
    long = [p for p in proteins if residue_count(p.sequence) > limit]
    if not long or mode == "embed":
        return proteins, []
    if mode == "error":
        raise RunError(f"{len(long)} proteins are longer than {limit} residues: "
                       f"{_names([p.id for p in long])}; use --long truncate, skip or embed")
    if mode == "skip":
        skipped = {id(p) for p in long}
        return [p for p in proteins if id(p) not in skipped], long
    for protein in long:
        protein.sequence = truncate(protein.sequence, limit)
        protein.truncated = True
    return proteins, []


# --- reporting ----------------------------------------------------------------------------


def embed_summary(args, total: int, good, failed: list[EmbedResult], skipped: list[_Protein],
                  dropped: int, limit: int) -> list[str]:
    """What happened to each protein, as lines for stderr."""
    truncated = [p.id for p, _ in good if p.truncated]
    parts = [f"{len(good)} embedded"]
    if truncated:
        parts.append(f"{len(truncated)} of them truncated to {limit} residues")
    parts += [f"{len(skipped)} skipped (longer than {limit} residues)", f"{len(failed)} failed"]
    if dropped:
        parts.append(f"{dropped} repeated records dropped (--dedupe)")
    lines = [f"esmc embed: {total} proteins: " + ", ".join(parts)]
    if good:
        lines.append(f"esmc embed: wrote {len(good)} embeddings to {args.output}")
    if truncated:
        lines.append(f"esmc embed: truncated: {_names(truncated)}")
    if skipped:
        lines.append(f"esmc embed: skipped: {_names([p.id for p in skipped])}")
    by_code: dict[str, list[EmbedResult]] = defaultdict(list)
    for result in failed:
        by_code[result.error.code].append(result)
    for code, results in by_code.items():
        ids = [r.id for r in results]
        first = results[0].error.message
        same = all(r.error.message == first for r in results)
        why = f"{code}: {first}" if same else f"{code}, first: {ids[0]}: {first}"
        lines.append(f"esmc embed: failed ({len(ids)}) {_names(ids)}: {why}")
    if (failed or skipped) and args.errors is not None:
        lines.append(f"esmc embed: every failed or skipped protein is listed in {args.errors}")
    elif failed:
        lines.append("esmc embed: --errors FILE lists every failed protein with its error")
    return lines


def write_errors(path: Path, failed: list[EmbedResult], skipped: list[_Protein], limit: int) -> None:
    """``id<TAB>status<TAB>message`` per failed or skipped protein, with a header line."""
    lines = ["id\tstatus\tmessage"]
    lines += [f"{r.id}\t{r.error.code}\t{_one_line(r.error.message)}" for r in failed]
    lines += [f"{p.id}\tSKIPPED\tlonger than {limit} residues (--long skip)" for p in skipped]
    path.write_text("\n".join(lines) + "\n")


def _names(ids: Sequence[str]) -> str:
    shown = ", ".join(ids[:_LISTED])
    return shown + (f" and {len(ids) - _LISTED} more" if len(ids) > _LISTED else "")


def _one_line(text: str) -> str:
    return " ".join(text.split())


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


def connect(args: argparse.Namespace, retry: RetryPolicy | None = None) -> ESMCClient:
    """A client for ``--target`` with the token and TLS settings of ``args``."""
    try:
        return ESMCClient(args.target, retry=retry, token=args.token or None, tls=args.tls,
                          root_certificates=args.tls_ca, client_certificate=args.tls_cert,
                          client_key=args.tls_key)
    except (ValueError, OSError) as error:
        raise RunError(str(error)) from None


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


def _embed_output(text: str) -> Path:
    path = Path(text)
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise argparse.ArgumentTypeError(f"{text}: the output must end in {', '.join(FORMATS)}")
    module = FORMATS[suffix]
    if module is not None:
        import importlib.util

        if importlib.util.find_spec(module) is None:
            raise argparse.ArgumentTypeError(f"writing {suffix} needs {module} (pip install {module})")
    return path


def prepare_output(path: Path) -> None:
    """Create the output's directory (e.g. ``runs/``) and check it is writable, before any work."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise RunError(f"cannot create {path.parent}: {error.strerror or error}") from None
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise RunError(f"cannot write {path}: permission denied")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


if __name__ == "__main__":
    sys.exit(main())
