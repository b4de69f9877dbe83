"""The ``esmc`` command.

    esmc info
    esmc embed proteins.fasta -o runs/embeddings.npz --layer -1
    esmc logits MKTAYIAKQR --top 3
    esmc generate "MKT___LL__" --steps 8 --strategy entropy --stream
    esmc score MKTAYIAKQR --variants variants.csv
    esmc serve --model esmc-tiny --port 50051          # the [server] extra
    esmc ray-embed proteins.fasta -o runs/parts/       # the [ray] extra

``--target`` defaults to ``$ESMC_TARGET``, else ``127.0.0.1:50051``.

Exit status: 0 when everything asked for was done; 1 when some proteins failed (each is
named in the summary, and in ``--errors FILE``); 2 when the run could not be done at all
(bad arguments or input, a server that cannot be reached, an option this model does not
have): reported once, as one line, before any per-protein work; 130 when interrupted; 141
when the reader of the output went away (``esmc info | head -1``).

The client's own commands live in :mod:`esmc_client.cli_commands`,
:mod:`esmc_client.cli_embed` and :mod:`esmc_client.cli_score` (each adds itself with
``add_<name>_command(sub, common)``), their shared options in :mod:`esmc_client.cli_options`.
Other installed packages add commands through the ``esmc.commands`` entry-point group: the
entry point's name is the subcommand, its object a ``main(argv) -> int`` called with the
arguments after the name (the server registers ``serve``, the Ray jobs ``ray-embed`` and
``ray-score``). The client imports none of them: a command whose package cannot load (its
extra is not installed) is one line naming the extra, and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

from esmc_client.cli_commands import add_generate_command, add_info_command, add_logits_command
from esmc_client.cli_embed import add_embed_command
from esmc_client.cli_options import (
    EXIT_RUN_FAILED,
    Parser,
    common_options,
    default_target,
    quiet_native_logs,
    run_command,
)
from esmc_client.cli_score import add_score_command

COMMANDS_GROUP = "esmc.commands"
"""The entry-point group through which installed packages add ``esmc`` subcommands."""
DISTRIBUTION = "esmc-serve"
_BUILT_IN = (add_info_command, add_embed_command, add_logits_command, add_generate_command,
             add_score_command)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    plugins = installed_commands()
    if argv and argv[0] in plugins:
        return run_plugin(argv[0], plugins[argv[0]], argv[1:])
    quiet_native_logs(verbose="-v" in argv or "--verbose" in argv)
    parser = build_parser(default_target(), plugins)
    args, extra = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_RUN_FAILED
    if extra:  # the subcommand's usage, not the top-level one
        parser.subcommands[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    return run_command(args.command, args, args.run)


def build_parser(
    default_target: str | None = None, plugins: dict[str, metadata.EntryPoint] | None = None
) -> argparse.ArgumentParser:
    """The ``esmc`` parser with the client's commands (``plugins``: listed, not parsed)."""
    parser = Parser(
        prog="esmc",
        description="ESMC over gRPC (esmc-serve). Exit status: 0 done, 1 some proteins "
        "failed (listed), 2 the run could not be done (one line says why).",
    )
    common = common_options(default_target)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for add_command in _BUILT_IN:
        add_command(sub, common)
    for name, entry in sorted((installed_commands() if plugins is None else plugins).items()):
        extra = f" (the [{entry.extras[0]}] extra)" if entry.extras else ""
        sub.add_parser(name, add_help=False, help=f"see esmc {name} --help{extra}")
    parser.subcommands = sub.choices
    return parser


def run_plugin(name: str, entry: metadata.EntryPoint, argv: list[str]) -> int:
    """Load an installed command and run it; a package that cannot load is one line."""
    try:
        command = entry.load()
    except ImportError as error:
        extra = entry.extras[0] if entry.extras else None
        need = f"the {extra} extra: pip install '{DISTRIBUTION}[{extra}]'" if extra else entry.value
        print(f"esmc {name} needs {need} ({error})", file=sys.stderr)
        return EXIT_RUN_FAILED
    return command(argv) or 0


def installed_commands() -> dict[str, metadata.EntryPoint]:
    """The ``esmc.commands`` entry points of the installed distributions, by name; when the
    client runs from a source checkout, its ``pyproject.toml`` is read too (it lists the
    commands of the code being run, which an older editable install may not)."""
    found = {entry.name: entry for entry in metadata.entry_points(group=COMMANDS_GROUP)}
    found.update(_source_tree_commands(Path(__file__).resolve().parents[2] / "pyproject.toml"))
    return found


def _source_tree_commands(pyproject: Path) -> dict[str, metadata.EntryPoint]:
    try:
        project = tomllib.loads(pyproject.read_text()).get("project", {})
    except (OSError, tomllib.TOMLDecodeError):
        return {}
    if project.get("name") != DISTRIBUTION:
        return {}
    table = project.get("entry-points", {}).get(COMMANDS_GROUP, {})
    return {name: metadata.EntryPoint(name, value, COMMANDS_GROUP) for name, value in table.items()}


if __name__ == "__main__":
    sys.exit(main())
