"""The esmc CLI's answers to common mistakes: one line naming the problem, exit status 2
(141 for a reader that went away), the subcommand's usage for an unknown flag, a hint for a
server that is not there or not a gRPC server, gRPC's own log lines only with --verbose, and
every option's default in --help."""

from __future__ import annotations

import argparse
import http.server
import os
import socket
import subprocess
import sys
import threading

import pytest

from esmc_client.cli import build_parser, main
from esmc_client.cli_options import UPPERCASE_HINT, HelpFormatter
from esmc_ray.cli import embed_parser, score_parser
from esmc_server.config import BatchingConfig, ServerConfig
from helpers.inprocess import ThreadServer
from helpers.models import TINY, random_model

pytestmark = pytest.mark.unit


def one_line_error(capsys, prefix: str) -> str:
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1, captured.err
    assert captured.err.startswith(prefix), captured.err
    assert "Traceback" not in captured.err
    return captured.err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class QuietHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        pass


@pytest.fixture
def http1_port():
    """An HTTP/1 server (like the metrics port) on a free port."""
    server = http.server.HTTPServer(("127.0.0.1", 0), QuietHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def cli(*args: str, stdout=subprocess.PIPE) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "GRPC_VERBOSITY"}
    return subprocess.run([sys.executable, "-m", "esmc_client.cli", *args], env=env,
                          stdout=stdout, stderr=subprocess.PIPE, text=True, timeout=120)


# -- esmc score: files and sequences -------------------------------------------------------


def test_score_of_a_missing_file_is_not_a_sequence(capsys):
    assert main(["score", "nothere.fasta", "--target", "127.0.0.1:1"]) == 2
    one_line_error(capsys, "esmc score: nothere.fasta: no such file")


def test_score_with_a_missing_variants_file(capsys, tmp_path):
    missing = tmp_path / "missing.csv"
    assert main(["score", "MKTAYIAK", "--variants", str(missing), "--target", "127.0.0.1:1"]) == 2
    err = one_line_error(capsys, f"esmc score: cannot read {missing}: ")
    assert "No such file" in err


def test_score_with_a_csv_without_a_mutant_column(capsys, tmp_path):
    dms = tmp_path / "dms.csv"
    dms.write_text("variant,DMS_score\nK2A,0.5\n")
    assert main(["score", "MKTAYIAK", "--variants", str(dms), "--target", "127.0.0.1:1"]) == 2
    err = one_line_error(capsys, f"esmc score: {dms} has no 'mutant' column")
    assert "variant, DMS_score" in err


def test_score_refuses_lowercase_like_every_command(capsys, tmp_path):
    assert main(["score", "mktayiak", "--target", "127.0.0.1:1"]) == 2
    err = one_line_error(capsys, "esmc score: the wild type contains lowercase letters")
    assert UPPERCASE_HINT in err
    fasta = tmp_path / "wt.fasta"
    fasta.write_text(">wt\nMKTayiak\n")
    assert main(["score", str(fasta), "--target", "127.0.0.1:1"]) == 2
    err = one_line_error(capsys, f"esmc score: wt in {fasta} contains lowercase letters")
    assert "'a' at residue 4" in err and UPPERCASE_HINT in err
    assert main(["logits", "mkt", "--target", "127.0.0.1:1"]) == 2  # the same hint elsewhere
    assert UPPERCASE_HINT in one_line_error(capsys, "esmc logits: the sequence contains")


@pytest.mark.e2e
def test_score_uppercase_flag_and_a_fasta_wild_type_score_the_same(tmp_path, capsys):
    server = ThreadServer(random_model(TINY, seed=3),
                          ServerConfig(port=0, metrics_port=None, warmup=False,
                                       batching=BatchingConfig(max_wait_ms=2.0)))
    try:
        fasta = tmp_path / "wt.fasta"
        fasta.write_text(">wt\nMKTAYIAKQR\n")
        common = ["--variants", str(write_variants(tmp_path)), "--target", server.target]
        assert main(["score", "mktayiakqr", "--uppercase", *common]) == 0
        lowered = capsys.readouterr().out
        assert main(["score", str(fasta), *common]) == 0
        from_file = capsys.readouterr().out
    finally:
        server.close()
    assert lowered == from_file and lowered.startswith("mutant,score\nK2A,")


def write_variants(folder):
    path = folder / "variants.csv"
    path.write_text("mutant\nK2A\nT3W:Y5G\n")
    return path


# -- the command line itself ---------------------------------------------------------------


def test_an_unknown_flag_shows_the_subcommands_usage(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["info", "--bogus"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: esmc info ")
    assert err.rstrip().endswith("esmc info: error: unrecognized arguments: --bogus")


def test_every_client_option_shows_its_default():
    parser = build_parser("127.0.0.1:50051")
    parsers = {f"esmc {name}": p for name, p in parser.subcommands.items() if p.add_help}
    parsers.update({"esmc ray-embed": embed_parser(), "esmc ray-score": score_parser()})
    assert set(parsers) == {"esmc info", "esmc embed", "esmc logits", "esmc generate",
                            "esmc score", "esmc ray-embed", "esmc ray-score"}
    missing = []
    for name, p in parsers.items():
        formatter = HelpFormatter(name)
        for action in p._actions:
            if action.option_strings and not action.required:
                if isinstance(action, argparse._HelpAction):
                    continue
                if "default" not in formatter._get_help_string(action):
                    missing.append(f"{name} {action.option_strings[-1]}")
    assert missing == []
    assert "(default: masked-marginals)" in " ".join(parsers["esmc score"].format_help().split())


# -- servers that are not there, or not gRPC -----------------------------------------------


def test_a_refused_connection_hints_at_esmc_serve_and_target(capsys):
    target = f"127.0.0.1:{free_port()}"
    assert main(["info", "--target", target, "--timeout", "10"]) == 2
    err = one_line_error(capsys, f"esmc info: cannot use the server at {target}: UNAVAILABLE")
    assert "esmc serve" in err and "--target" in err


def test_the_metrics_port_is_named_for_what_it_is(capsys, http1_port):
    assert main(["info", "--target", f"127.0.0.1:{http1_port}", "--timeout", "10"]) == 2
    err = one_line_error(capsys, f"esmc info: cannot use the server at 127.0.0.1:{http1_port}")
    assert "HTTP/1, not gRPC" in err and "--port" in err
    assert "Failed parsing HTTP/2" not in err


def test_grpc_core_log_lines_only_with_verbose(http1_port):
    """A TLS client against a plaintext port makes gRPC's C core log the failed handshake."""
    args = ["info", "--tls", "--target", f"127.0.0.1:{http1_port}", "--timeout", "10"]
    quiet = cli(*args)
    assert quiet.returncode == 2
    assert quiet.stderr.count("\n") == 1 and quiet.stderr.startswith("esmc info: "), quiet.stderr
    loud = cli(*args, "--verbose")
    assert loud.returncode == 2
    assert "ssl_transport_security" in loud.stderr and loud.stderr.count("\n") > 1


def test_the_cli_loads_no_grpc_before_it_has_set_the_log_level():
    script = ("import sys, esmc_client.cli, esmc_ray.cli; "
              "print(sorted(m for m in sys.modules if m.split('.')[0] in ('grpc', 'torch', 'ray')))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# -- pipes ---------------------------------------------------------------------------------


@pytest.mark.e2e
def test_a_reader_that_goes_away_is_no_traceback(tmp_path):
    server = ThreadServer(random_model(TINY, seed=3),
                          ServerConfig(port=0, metrics_port=None, warmup=False))
    try:
        head = subprocess.Popen(["head", "-1"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        # more than a pipe's buffer, so the writer meets the closed pipe while it writes
        run = cli("logits", "MKTAYIAKQR" * 100, "--top", "20", "--target", server.target,
                  stdout=head.stdin)
        head.stdin.close()
        first = head.stdout.read().decode()
        head.wait(30)
    finally:
        server.close()
    assert first.startswith("logits (1002, 64)")
    assert run.returncode == 141, run.stderr
    assert run.stderr == ""


# -- Ray jobs ------------------------------------------------------------------------------


def test_ray_without_a_cluster_at_address_auto_is_one_line(tmp_path):
    pytest.importorskip("ray")
    fasta = tmp_path / "in.fasta"
    fasta.write_text(">a\nMKT\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "GRPC_"))}
    env["RAY_TMPDIR"] = str(tmp_path / "ray")  # where `auto` looks for a running cluster: none
    run = subprocess.run(
        [sys.executable, "-m", "esmc_client.cli", "ray-embed", str(fasta), "-o",
         str(tmp_path / "out"), "--address", "auto"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 2
    assert run.stderr.startswith("esmc ray-embed: no Ray cluster at --address auto ("), run.stderr
    assert run.stderr.count("\n") == 1 and "ray start --head" in run.stderr
