"""The ``esmc`` CLI against real servers: whole-run errors once with exit status 2, a
summary of per-protein failures (and ``--errors``), ``--long``, ``--pool``, metadata read
back from every format, generation step numbering, and the README's embed example on the
whole shipped proteome against an ``esmc serve`` subprocess.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from esmc import ESMC, ESMCConfig
from esmc_client import ESMCClient, ESMCError, LogitsConfig, RetryPolicy
from esmc_client.cli import main as cli_main
from esmc_client.outputs import read_embeddings
from esmc_server.config import BatchingConfig, ServerConfig
from helpers.checkpoints import write_legacy_repo
from helpers.data import ROOT, proteome_path
from helpers.inprocess import ThreadServer
from helpers.processes import free_port

pytestmark = pytest.mark.e2e



def tiny() -> ESMC:
    torch.manual_seed(0)
    return ESMC(ESMCConfig(d_model=64, n_heads=1, n_layers=2)).eval()


@pytest.fixture(scope="module")
def served():
    server = ThreadServer(tiny(), ServerConfig(port=0, metrics_port=None, warmup=False,
                                               batching=BatchingConfig(max_wait_ms=2.0)))
    yield server
    server.close()


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli_main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def fasta(tmp_path: Path, records: list[tuple[str, str]]) -> Path:
    path = tmp_path / "in.fasta"
    path.write_text("".join(f">{uid} description\n{seq}\n" for uid, seq in records))
    return path


CLOSE = {"rtol": 1e-5, "atol": 1e-6}  # the same protein in another batch (packed forwards)
RECORDS = [("a", "MKTAYIAKQR"), ("b", "LLVVGG"), ("c", "MKT"), ("d", "ACDEFGHIKLMNPQRSTVWY")]


@pytest.mark.parametrize("suffix", [".npz", ".h5", ".parquet"])
def test_every_format_records_the_run_and_equals_the_client(served, tmp_path, capsys, suffix):
    out = tmp_path / f"sub/dir/out{suffix}"  # directories are created
    code, _, err = run_cli(capsys, "embed", str(fasta(tmp_path, RECORDS)), "-o", str(out),
                           "--layer", "-2", "--dtype", "float16", "--target", served.target)
    assert code == 0, err
    back = read_embeddings(out)
    assert back.ids == ["a", "b", "c", "d"]
    with ESMCClient(served.target) as client:
        info = client.info()
        expected = client.embed(RECORDS, layer=-2, output_dtype="float16")
    limit = info.max_length - 2
    assert back.metadata == {"model": "esmc-tiny", "layer": -2, "pooling": "mean",
                             "dtype": "float16", "server_version": info.server_version,
                             "d_model": 64, "n_layers": 2, "max_residues": limit, "format": 1}
    assert info.server_version  # the server says its version, and the file records it
    np.testing.assert_allclose(back.embeddings, np.stack([r.embedding for r in expected]),
                               rtol=2e-3, atol=2e-3)  # float16 on the wire, batched differently
    assert f"4 proteins: 4 embedded, 0 skipped (longer than {limit} residues), 0 failed" in err


def test_pool_none_keeps_every_position(served, tmp_path, capsys):
    out = tmp_path / "positions.npz"
    code, _, err = run_cli(capsys, "embed", str(fasta(tmp_path, RECORDS)), "-o", str(out),
                           "--pool", "none", "--target", served.target)
    assert code == 0, err
    back = read_embeddings(out)
    lengths = [len(s) + 2 for _, s in RECORDS]
    assert np.diff(back.offsets).tolist() == lengths and back.metadata["pooling"] == "none"
    with ESMCClient(served.target) as client:
        full = client.logits("LLVVGG", LogitsConfig(return_embeddings=True)).embeddings
    np.testing.assert_allclose(back[1], full, **CLOSE)


def test_bad_layer_is_one_line_before_any_work(served, tmp_path, capsys):
    out = tmp_path / "out.npz"
    code, _, err = run_cli(capsys, "embed", str(fasta(tmp_path, RECORDS)), "-o", str(out),
                           "--layer", "7", "--target", served.target)
    assert code == 2 and not out.exists()
    assert err == ("esmc embed: --layer 7 does not exist: esmc-tiny has 2 layers (-1: final "
                   "embeddings; 0..1: a block's output; -2..-2: from the end)\n")


def test_per_protein_failures_are_summarised_and_written(served, tmp_path, capsys):
    records = [("ok1", "MKTL"), ("bad1", "MKJL"), ("ok2", "LLV"), ("bad2", "MKBJ"), ("e", "")]
    out, errors = tmp_path / "out.npz", tmp_path / "errors.tsv"
    code, _, err = run_cli(capsys, "embed", str(fasta(tmp_path, records)), "-o", str(out),
                           "--errors", str(errors), "--target", served.target)
    assert code == 1
    assert read_embeddings(out).ids == ["ok1", "ok2"]
    assert re.search(r"5 proteins: 2 embedded, 0 skipped \(longer than \d+ residues\), 3 failed", err)
    assert "failed (3) bad1, bad2, e: INVALID_ARGUMENT, first: bad1: " in err
    rows = [line.split("\t") for line in errors.read_text().splitlines()]
    assert rows[0] == ["id", "status", "message"]
    assert [(r[0], r[1]) for r in rows[1:]] == [
        ("bad1", "INVALID_ARGUMENT"), ("bad2", "INVALID_ARGUMENT"), ("e", "INVALID_ARGUMENT")]
    assert "'J'" in rows[1][2]
    assert err.count("Traceback") == 0


def test_long_proteins_error_truncate_or_skip(served, tmp_path, capsys):
    records = [("short", "MKTL"), ("long1", "MKTLLVVAAG"), ("long2", "ACDEFGHIKLMN")]
    path = fasta(tmp_path, records)
    out = tmp_path / "out.npz"
    common = ["-o", str(out), "--max-residues", "6", "--target", served.target]

    code, _, err = run_cli(capsys, "embed", str(path), *common, "--long", "error")
    assert code == 2 and not out.exists()
    assert err == ("esmc embed: 2 proteins are longer than 6 residues: long1, long2; use --long "
                   "truncate, skip or embed\n")

    code, _, err = run_cli(capsys, "embed", str(path), *common, "--long", "skip",
                           "--errors", str(tmp_path / "e.tsv"))
    assert code == 0 and read_embeddings(out).ids == ["short"]
    assert "3 proteins: 1 embedded, 2 skipped (longer than 6 residues), 0 failed" in err
    assert "skipped: long1, long2" in err
    assert "long1\tSKIPPED\t" in (tmp_path / "e.tsv").read_text()

    code, _, err = run_cli(capsys, "embed", str(path), *common, "--long", "truncate")
    back = read_embeddings(out)
    assert code == 0 and back.ids == ["short", "long1", "long2"]
    assert back.truncated.tolist() == [False, True, True] and back.metadata["max_residues"] == 6
    assert "3 embedded, 2 of them truncated to 6 residues" in err
    with ESMCClient(served.target) as client:
        cut = client.embed([("long1", "MKTLLV"), ("long2", "ACDEFG")])
    np.testing.assert_allclose(back.embeddings[1:], np.stack([r.embedding for r in cut]), **CLOSE)

    code, _, err = run_cli(capsys, "embed", str(path), *common)  # default: embed (all fit here)
    assert code == 0 and read_embeddings(out).truncated.tolist() == [False, False, False]


def test_proteins_the_server_refuses_as_too_long_get_a_hint(tmp_path, capsys):
    server = ThreadServer(tiny(), ServerConfig(port=0, metrics_port=None, warmup=False,
                                               max_length=8))
    try:
        path = fasta(tmp_path, [("short", "MKTL"), ("long", "MKTLLVVAAG")])
        code, _, err = run_cli(capsys, "embed", str(path), "-o", str(tmp_path / "o.npz"),
                               "--target", server.target)
        assert code == 1 and "failed (1) long: INVALID_ARGUMENT" in err
        assert ("1 failed proteins are longer than the server's limit of 8 residues: --long "
                "truncate or --long skip handles them") in err
        code, _, err = run_cli(capsys, "embed", str(path), "-o", str(tmp_path / "o.npz"),
                               "--long", "truncate", "--target", server.target)
        assert code == 0 and read_embeddings(tmp_path / "o.npz").truncated.tolist() == [False, True]
    finally:
        server.close()


def test_dedupe_keeps_the_first_record(served, tmp_path, capsys):
    path = fasta(tmp_path, [("a", "MKTL"), ("b", "LLV"), ("a", "GGGG")])
    out = tmp_path / "out.npz"
    code, _, err = run_cli(capsys, "embed", str(path), "-o", str(out), "--target", served.target)
    assert code == 2 and "1 ids occur more than once in" in err and ": a; " in err
    code, _, err = run_cli(capsys, "embed", str(path), "-o", str(out), "--dedupe",
                           "--target", served.target)
    assert code == 0 and read_embeddings(out).ids == ["a", "b"]
    assert "1 repeated records dropped (--dedupe)" in err


def test_uppercase_is_explicit_and_the_same_everywhere(served, tmp_path, capsys):
    path = fasta(tmp_path, [("a", "mktl"), ("b", "LLV")])
    out = tmp_path / "out.npz"
    code, _, err = run_cli(capsys, "embed", str(path), "-o", str(out), "--target", served.target)
    assert code == 2 and "pass --uppercase" in err
    code, _, err = run_cli(capsys, "embed", str(path), "-o", str(out), "--uppercase",
                           "--target", served.target)
    assert code == 0
    with ESMCClient(served.target) as client:
        np.testing.assert_allclose(read_embeddings(out).embeddings[0],
                                   client.embed(["MKTL"])[0].embedding, **CLOSE)
        with pytest.raises(ESMCError) as error:  # the client sends as is: the server refuses
            client.logits("mktl")
    assert error.value.code == "INVALID_ARGUMENT" and "'m'" in error.value.message
    code, out_text, err = run_cli(capsys, "logits", "mktl", "--target", served.target)
    assert code == 2 and "pass --uppercase" in err
    code, out_text, err = run_cli(capsys, "logits", "mktl", "--uppercase", "--target", served.target)
    assert code == 0 and out_text.startswith("logits (6, 64)")


def test_generate_numbers_steps_from_1_and_says_when_steps_exceed_masks(served, capsys):
    code, out, err = run_cli(capsys, "generate", "MKT__LL_", "--steps", "8", "--stream",
                             "--seed", "1", "--target", served.target)
    assert code == 0, err
    lines = out.splitlines()
    assert [line.split()[:2] for line in lines[:3]] == [["step", "1/3"], ["step", "2/3"],
                                                        ["step", "3/3"]]
    assert len(lines) == 4 and "_" not in lines[3] and lines[3] == lines[2].split()[-1]
    assert err == ("esmc generate: --steps 8 is more than the prompt's 3 masked positions: "
                   "running 3 steps\n")


def test_errors_print_the_status_once(served, capsys):
    code, _, err = run_cli(capsys, "generate", "MKTLL", "--target", served.target)
    assert code == 2
    assert err.startswith("esmc generate: INVALID_ARGUMENT: ") and err.count("INVALID_ARGUMENT") == 1
    assert err.count("\n") == 1


# --- the README's embed example on the whole shared proteome --------------------------------

README_FASTA = "examples/proteins.fasta"


def _readme_embed_command() -> list[str]:
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.startswith(f"esmc embed {README_FASTA}"):
            return shlex.split(line.split("#")[0])
    raise AssertionError(f"the README has no `esmc embed {README_FASTA}` example")


def test_readme_embed_example_on_the_whole_proteome(tmp_path):
    """The README's embed command (tests/test_docs.py runs it as written on the shipped
    examples) given the whole proteome in place of its FASTA: 2,100 proteins (5 longer than
    2,046 residues) against `esmc serve`: exit 0, 2,100 ids."""
    proteome = proteome_path()
    command = _readme_embed_command()
    command[command.index(README_FASTA)] = str(proteome)
    output = Path(command[command.index("-o") + 1])
    assert output.parts[0] == "runs"  # ignored by .gitignore
    assert "/runs/" in (ROOT / ".gitignore").read_text().split()
    weights = tmp_path / "tiny-random"
    write_legacy_repo(tiny(), weights, with_config=True)
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ESMC_TARGET": f"127.0.0.1:{port}"}
    server = subprocess.Popen(
        [sys.executable, "-m", "esmc_client.cli", "serve", "--model", str(weights), "--port",
         str(port), "--metrics-port", "off", "--no-warmup"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        with ESMCClient(env["ESMC_TARGET"], retry=RetryPolicy(max_retries=0)) as client:
            for _ in range(600):
                try:
                    info = client.info(timeout=1)
                    break
                except ESMCError:
                    time.sleep(0.1)
            else:
                raise AssertionError("esmc serve did not start")
        assert info.max_length - 2 >= 4559  # the proteome's longest protein
        start = time.monotonic()
        command[0:1] = [sys.executable, "-m", "esmc_client.cli"]
        result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True,
                                timeout=600)
        seconds = time.monotonic() - start
    finally:
        server.kill()
        server.wait(30)
    assert result.returncode == 0, result.stderr[-2000:]
    back = read_embeddings(tmp_path / output)
    ids = [line[1:].split()[0] for line in proteome.read_text().splitlines() if line.startswith(">")]
    assert len(ids) == 2100 and back.ids == ids and back.embeddings.shape == (2100, 64)
    assert np.isfinite(back.embeddings).all()
    assert "2100 proteins: 2100 embedded" in result.stderr
    print(f"README example on the proteome: {seconds:.1f} s")
    assert re.search(r"wrote 2100 embeddings to runs/", result.stderr)
