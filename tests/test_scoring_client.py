"""Scoring through the client (sync and async) and ``esmc score`` against a real server."""

from __future__ import annotations

import asyncio
import csv
import threading

import numpy as np
import pytest

from esmc import scoring
from esmc_client import AsyncESMCClient, ESMCClient, ESMCError
from esmc_client.cli import build_parser
from esmc_client.cli import main as cli_main
from esmc_client.cli_score import rank_average, spearman, spearman_of
from esmc_server.app import create_server
from esmc_server.config import BatchingConfig, ServerConfig
from helpers.models import TINY, random_model, random_sequences

WILD_TYPE = random_sequences([24], seed=11)[0]
VARIANTS = [f"{WILD_TYPE[0]}1A", f"{WILD_TYPE[3]}4W", f"{WILD_TYPE[3]}4C:{WILD_TYPE[9]}10G"]


@pytest.fixture(scope="module")
def served():
    model = random_model(TINY, seed=6)
    config = ServerConfig(
        port=0, metrics_port=None, warmup=False, batching=BatchingConfig(max_wait_ms=2.0)
    )
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="esmc-scoring-server", daemon=True)
    thread.start()
    server, port = asyncio.run_coroutine_threadsafe(
        create_server(config, model=model), loop
    ).result(120)
    yield model, f"127.0.0.1:{port}"
    asyncio.run_coroutine_threadsafe(server.stop(5), loop).result(60)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(30)


def close(a, b) -> None:
    b = np.asarray(b)
    np.testing.assert_allclose(a, b, rtol=0, atol=2e-5 * max(1.0, np.abs(b).max()))


# -- client --------------------------------------------------------------------------------


@pytest.mark.e2e
def test_sync_client_scores_map_and_pll(served):
    model, target = served
    with ESMCClient(target) as client:
        scores = client.score_variants(WILD_TYPE, VARIANTS, joint_masking=True)
        wt_scores = client.score_variants(WILD_TYPE, VARIANTS, "wt-marginals")
        table = client.saturation_map(WILD_TYPE)
        one = client.pseudo_log_likelihood(WILD_TYPE[:12])
        many = client.pseudo_log_likelihood({"x": WILD_TYPE[:9], "bad": "MKZ1", "y": "MKTAYI"})
        with pytest.raises(ESMCError) as info:
            client.score_variants(WILD_TYPE, ["Q1P"] if WILD_TYPE[0] != "Q" else ["A1P"])
    assert scores.dtype == np.float32 and scores.shape == (3,)
    close(scores, scoring.score_variants(model, WILD_TYPE, VARIANTS, joint_masking=True))
    close(wt_scores, scoring.score_variants(model, WILD_TYPE, VARIANTS, "wt-marginals"))
    close(table, scoring.saturation_map(model, WILD_TYPE))
    expected = scoring.pseudo_log_likelihood(model, WILD_TYPE[:12])
    assert one.pseudo_log_likelihood == pytest.approx(expected.pseudo_log_likelihood, rel=1e-5)
    close(one.log_probs, expected.position_log_probs)
    assert [r.id for r in many] == ["x", "bad", "y"]
    assert many[1].error.code == "INVALID_ARGUMENT" and not many[1].ok
    assert many[2].pseudo_log_likelihood == pytest.approx(
        scoring.pseudo_log_likelihood(model, "MKTAYI").pseudo_log_likelihood, rel=1e-5
    )
    assert info.value.code == "INVALID_ARGUMENT" and "does not match" in info.value.message


@pytest.mark.e2e
async def test_async_client_scores_map_and_pll(served):
    model, target = served
    async with AsyncESMCClient(target) as client:
        scores = await client.score_variants(WILD_TYPE, VARIANTS, "pseudo-likelihood")
        table = await client.saturation_map(WILD_TYPE, "wt-marginals")
        many = await client.pseudo_log_likelihood([WILD_TYPE[:8], WILD_TYPE[8:20]])
    close(scores, scoring.score_variants(model, WILD_TYPE, VARIANTS, "pseudo-likelihood"))
    close(table, scoring.saturation_map(model, WILD_TYPE, "wt-marginals"))
    assert [r.id for r in many] == ["0", "1"]
    want = scoring.pseudo_log_likelihood(model, WILD_TYPE[8:20])
    assert many[1].pseudo_perplexity == pytest.approx(want.pseudo_perplexity, rel=1e-5)


def test_client_rejects_unknown_options_before_sending():
    from esmc_client.scoring import score_request

    with pytest.raises(ValueError, match="unknown method 'esm1v'"):
        score_request("MKT", ["K2A"], "esm1v")
    with pytest.raises(ValueError, match="unknown normalization"):
        score_request("MKT", ["K2A"], normalization="softmax")


# -- Spearman ------------------------------------------------------------------------------


def test_average_tie_ranks_and_spearman():
    assert rank_average(np.array([10.0, 20.0, 20.0, 5.0])).tolist() == [2.0, 3.5, 3.5, 1.0]
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # by hand: ranks a = (1, 2.5, 2.5, 4), b = (1, 3, 2, 4); Pearson of the ranks
    a, b = np.array([1, 2.5, 2.5, 4]), np.array([1, 3, 2, 4])
    a, b = a - a.mean(), b - b.mean()
    assert spearman([1, 5, 5, 9], [0.1, 0.7, 0.3, 0.9]) == pytest.approx(
        (a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum())
    )
    assert np.isnan(spearman([1, 1, 1], [1, 2, 3]))
    rows = [{"x": "1", "y": "2"}, {"x": "", "y": "3"}, {"x": "2", "y": "nan"}, {"x": "3", "y": "4"}]
    assert spearman_of(rows, "x", "y") == (pytest.approx(1.0), 2)


# -- esmc score ----------------------------------------------------------------------------


def test_score_arguments():
    args = build_parser().parse_args(
        ["score", "wt.fasta", "--variants", "dms.csv", "--method", "wt-marginals", "-o", "o.csv",
         "--offset", "10", "--joint-masking", "--normalization", "amino-acids"]
    )
    assert (args.wild_type, str(args.variants)) == ("wt.fasta", "dms.csv")
    assert args.method == "wt-marginals"
    assert (args.offset, args.joint_masking, args.normalization, args.column) == (
        10, True, "amino-acids", "score"
    )
    defaults = build_parser().parse_args(["score", "MKT"])
    assert defaults.method == "masked-marginals" and defaults.variants is None


@pytest.mark.e2e
def test_cli_score_proteingym_file(served, tmp_path, capsys):
    model, target = served
    fasta = tmp_path / "wt.fasta"
    fasta.write_text(f">other\nMKT\n>P1 wild type\n{WILD_TYPE[:12]}\n{WILD_TYPE[12:]}\n")
    dms = tmp_path / "P1_DMS.csv"
    dms_scores = ["0.5", "-1.25", "", "2.0"]
    variants = [*VARIANTS, f"{WILD_TYPE[5]}6Y"]
    with open(dms, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["mutant", "mutated_sequence", "DMS_score"])
        for v, s in zip(variants, dms_scores):
            writer.writerow([v, "-", s])
    out = tmp_path / "out.csv"
    code = cli_main(["score", str(fasta), "--id", "P1", "--variants", str(dms), "-o", str(out),
                     "--target", target])
    assert code == 0
    with open(out, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["mutant", "mutated_sequence", "DMS_score", "score"]
    assert [r["mutant"] for r in rows] == variants
    expected = scoring.score_variants(model, WILD_TYPE, variants).numpy()
    close(np.array([float(r["score"]) for r in rows]), expected)
    rho = spearman([0.5, -1.25, 2.0], [float(rows[i]["score"]) for i in (0, 1, 3)])
    printed = capsys.readouterr().out
    line = f"Spearman rho (DMS_score vs score, masked-marginals): {rho:.4f} over 3 variants"
    assert line in printed


@pytest.mark.e2e
def test_cli_score_every_single_substitution_and_plot(served, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    model, target = served
    png = tmp_path / "map.png"
    code = cli_main(["score", WILD_TYPE, "--plot", str(png), "--target", target])
    assert code == 0
    rows = list(csv.DictReader(capsys.readouterr().out.splitlines()))
    assert len(rows) == 19 * len(WILD_TYPE)
    assert rows[0]["mutant"] == f"{WILD_TYPE[0]}1A" or rows[0]["mutant"] == f"{WILD_TYPE[0]}1C"
    table = scoring.saturation_map(model, WILD_TYPE).numpy()
    columns = scoring.AMINO_ACIDS
    by_cell = {f"{w}{i + 1}{a}": table[i, j] for i, w in enumerate(WILD_TYPE)
               for j, a in enumerate(columns)}
    close([float(r["score"]) for r in rows], [by_cell[r["mutant"]] for r in rows])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
