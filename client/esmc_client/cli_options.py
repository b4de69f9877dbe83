"""What every ``esmc`` subcommand shares: its parser class (every option shows its default),
the connection options (``--target``, ``--timeout``, token and TLS, ``--verbose``), the
one-line run errors and exit codes, and the checks made before any work.

Subcommands of other packages (``esmc serve``, ``esmc ray-embed``) build on this module too,
so no CLI module imports another CLI module in a loop. This module loads without grpc: a
client (and with it gRPC's C core) is made only by :func:`connect`, after the command has
chosen how loud gRPC's own logging is (:func:`quiet_native_logs`).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

from esmc_client.channel import DEFAULT_TARGET, unreachable_reason
from esmc_client.fasta import first_lowercase
from esmc_client.retry import RetryPolicy
from esmc_client.types import ESMCError, ServerInfo

if TYPE_CHECKING:
    from esmc_client.client import ESMCClient

TARGET_ENV = "ESMC_TARGET"
MODEL_ENV = "ESMC_MODEL"
TOKEN_ENV = "ESMC_TOKEN"
TLS_ENV = "ESMC_TLS"
TLS_CA_ENV = "ESMC_TLS_CA"
TLS_CERT_ENV = "ESMC_TLS_CERT"
TLS_KEY_ENV = "ESMC_TLS_KEY"
GRPC_VERBOSITY_ENV = "GRPC_VERBOSITY"  # read by gRPC's C core once, when grpc is imported

EXIT_OK, EXIT_SOME_FAILED, EXIT_RUN_FAILED = 0, 1, 2
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, as a shell reports a command whose reader went away
UPPERCASE_HINT = "ESMC reads upper-case one-letter codes; pass --uppercase to upper-case the input"
_LISTED = 10  # ids named per line of a summary


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


def default_target(environ: Mapping[str, str] = os.environ) -> str:
    return environ.get(TARGET_ENV) or DEFAULT_TARGET


def common_options(target: str | None = None, environ: Mapping[str, str] = os.environ):
    """A parent parser with the options of every client command: ``--target``,
    ``--timeout``, ``--verbose`` and the token and TLS flags."""
    target = target or default_target(environ)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--target", default=target,
                        help=f"server, host:port or dns:///host:port (default ${TARGET_ENV}, "
                        f"else {DEFAULT_TARGET}; now {target})")
    common.add_argument("--model", default=environ.get(MODEL_ENV) or None,
                        help=f"the served model to use (default ${MODEL_ENV}, else the server's "
                        "default model); an answer from another model is an error")
    common.add_argument("--timeout", type=float, default=None,
                        help="deadline per call in seconds (default: none)")
    common.add_argument("-v", "--verbose", action="store_true",
                        help="show gRPC's and Ray's own log lines (default: quiet)")
    add_security_flags(common, environ)
    return common


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


def env_flag(environ, name: str) -> bool | None:
    """A boolean environment variable (``1/true/yes/on``, ``0/false/no/off``), None if unset."""
    text = environ.get(name, "").strip().lower()
    if not text:
        return None
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name}={text!r} is not a boolean")


def quiet_native_logs(verbose: bool, environ=os.environ) -> None:
    """Unless ``verbose`` (or ``$GRPC_VERBOSITY`` is set), silence gRPC's C-core log lines:
    the command reports each failure itself, in one line. Takes effect only when grpc has
    not been imported yet (the C core reads the variable once)."""
    if not verbose and "grpc" not in sys.modules:
        environ.setdefault(GRPC_VERBOSITY_ENV, "NONE")


def run_command(name: str, args: argparse.Namespace, run: Callable[[argparse.Namespace], int]) -> int:
    """``run(args)``, with a whole-run failure as one line ``esmc NAME: why`` and status 2, an
    interrupt as status 130 and a reader that went away (``esmc info | head -1``) as 141."""
    try:
        status = run(args)
        sys.stdout.flush()  # a closed pipe shows here, not at exit as a traceback
        return status
    except (RunError, ESMCError) as error:
        print(f"esmc {name}: {error}", file=sys.stderr)
        return EXIT_RUN_FAILED
    except KeyboardInterrupt:
        print(f"esmc {name}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        _drop_stdout()
        return EXIT_BROKEN_PIPE


def _drop_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's last flush finds no broken pipe."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # no real stdout (a test's capture): nothing to flush
        pass


def connect(args: argparse.Namespace, retry: RetryPolicy | None = None) -> ESMCClient:
    """A client for ``--target`` with the token and TLS settings of ``args``."""
    # grpc loads here, after quiet_native_logs: its C core reads its log level at import
    from esmc_client.client import ESMCClient

    try:
        return ESMCClient(args.target, retry=retry, token=args.token or None, tls=args.tls,
                          root_certificates=args.tls_ca, client_certificate=args.tls_cert,
                          client_key=args.tls_key, model=getattr(args, "model", None))
    except (ValueError, OSError) as error:
        raise RunError(str(error)) from None


def server_info(client: ESMCClient, args: argparse.Namespace) -> ServerInfo:
    """``Info``, or one line saying why the server cannot be used and what to change."""
    try:
        return client.info(timeout=args.timeout if args.timeout is not None else 30)
    except ESMCError as error:
        raise RunError(f"cannot use the server at {args.target}: {unreachable_reason(error)}") from None


def checked_sequence(sequence: str, uppercase: bool, what: str) -> str:
    """``sequence`` upper-cased when asked; lowercase letters are refused otherwise."""
    if uppercase:
        return sequence.upper().replace("<MASK>", "<mask>")
    if hit := first_lowercase(sequence):
        residue, letter = hit
        raise RunError(f"{what} contains lowercase letters ({letter!r} at residue {residue + 1}); "
                       f"{UPPERCASE_HINT}")
    return sequence


def positive(text: str) -> int:
    """An ``argparse`` type: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def names(ids: Sequence[str]) -> str:
    """The first ids of a list, and how many more there are."""
    shown = ", ".join(ids[:_LISTED])
    return shown + (f" and {len(ids) - _LISTED} more" if len(ids) > _LISTED else "")


def one_line(text: str) -> str:
    return " ".join(text.split())
