"""ScoreVariants and PseudoLogLikelihood(Stream) over a real server on port 0.

The server's scores equal the library's (esmc.scoring, itself checked against the official esm
ESMC in test_scoring.py); masked copies share forwards; every bad input answers
INVALID_ARGUMENT naming the variant, the option or the limit.
"""

from __future__ import annotations

import asyncio
import dataclasses

import grpc
import numpy as np
import pytest
import torch

from esmc import scoring
from esmc_proto.v1 import esmc_pb2 as pb
from helpers.models import TINY, random_model, random_sequences
from helpers.inprocess import running_server, server_config
from helpers.wire import protein_request, to_numpy

pytestmark = pytest.mark.e2e
WILD_TYPE = random_sequences([37], seed=7)[0]


def variants_of(wt: str) -> list[str]:
    singles = [f"{wt[i]}{i + 1}{aa}" for i, aa in [(0, "A"), (5, "W"), (5, "C"), (30, "P")]]
    return [*singles, f"{wt[2]}3D:{wt[9]}10L", f"{wt[4]}5W:{wt[30]}31G:{wt[33]}34Y"]


VARIANTS = variants_of(WILD_TYPE)


@pytest.fixture(scope="module")
def model():
    return random_model(TINY, seed=4)


def score_request(variants=VARIANTS, wild_type=WILD_TYPE, **fields) -> pb.ScoreVariantsRequest:
    return pb.ScoreVariantsRequest(
        wild_type=pb.ESMProtein(sequence=wild_type), variants=variants, **fields
    )


def assert_equal_scores(server: np.ndarray, library: torch.Tensor) -> None:
    library = library.numpy()
    assert server.shape == library.shape
    np.testing.assert_allclose(server, library, rtol=0, atol=2e-5 * max(1.0, np.abs(library).max()))


@pytest.mark.parametrize(
    ("method", "name", "joint"),
    [
        (pb.WT_MARGINALS, "wt-marginals", False),
        (pb.MASKED_MARGINALS, "masked-marginals", False),
        (pb.MASKED_MARGINALS, "masked-marginals", True),
        (pb.SCORING_METHOD_UNSPECIFIED, "masked-marginals", False),
        (pb.PSEUDO_LIKELIHOOD, "pseudo-likelihood", False),
    ],
)
async def test_server_scores_equal_library(model, method, name, joint):
    wt, variants = WILD_TYPE, VARIANTS
    if name == "pseudo-likelihood":  # L forwards per mutant: a shorter protein, fewer variants
        wt = WILD_TYPE[:20]
        variants = [f"{wt[0]}1A", f"{wt[5]}6W", f"{wt[2]}3D:{wt[9]}10L"]
    async with running_server(model, server_config()) as running:
        response = await running.stub.ScoreVariants(
            score_request(variants, wt, method=method, joint_masking=joint,
                          include_saturation_map=True),
            timeout=60,
        )
    plan = scoring.plan_scores(wt, variants, name, joint_masking=joint, saturation_map=True)
    expected = scoring.run_plan(model, plan)
    assert_equal_scores(to_numpy(response.scores), expected.scores)
    assert_equal_scores(to_numpy(response.saturation_map), expected.saturation_map)
    assert response.saturation_columns == "ACDEFGHIKLMNPQRSTVWY"
    assert response.masked_copies == len(plan.copies)


async def test_renormalisation_and_offset_reach_the_library(model):
    shifted = [f"{v[0]}{int(v[1:-1]) + 100}{v[-1]}" for v in VARIANTS[:4]]
    async with running_server(model, server_config()) as running:
        response = await running.stub.ScoreVariants(
            score_request(shifted, offset=100, normalization=pb.NORMALIZATION_AMINO_ACIDS),
            timeout=60,
        )
    expected = scoring.score_variants(model, WILD_TYPE, VARIANTS[:4], normalization="amino-acids")
    assert_equal_scores(to_numpy(response.scores), expected)
    assert not response.HasField("saturation_map")


async def test_masked_copies_share_forwards_with_each_other_and_with_logits(model):
    """A saturation map's 37 copies ride in a few forwards, alongside a Logits call."""
    async with running_server(model, server_config(max_wait_ms=20)) as running:
        before = running.engine.stats.forwards
        scored, logits = await asyncio.gather(
            running.stub.ScoreVariants(score_request([], include_saturation_map=True), timeout=60),
            running.stub.Logits(protein_request("MKTAYIAKQR", sequence=True), timeout=60),
        )
        forwards = running.engine.stats.forwards - before
    assert scored.masked_copies == len(WILD_TYPE)
    assert 1 <= scored.metadata.forwards <= forwards < len(WILD_TYPE) // 4
    assert scored.metadata.batch_size > 1
    assert to_numpy(scored.saturation_map).shape == (len(WILD_TYPE), 20)
    assert to_numpy(logits.logits.sequence).shape == (12, 64)


async def test_one_request_never_fills_the_queue(model):
    """With a queue of 8, a request of 37 copies keeps 2 queued at a time and succeeds, and
    a Logits call sent alongside is admitted."""
    config = server_config(max_queue=8, max_batch_tokens=100)
    async with running_server(model, config) as running:
        scored, logits = await asyncio.gather(
            running.stub.ScoreVariants(score_request([], include_saturation_map=True), timeout=60),
            running.stub.Logits(protein_request("MKTAYIAKQR", sequence=True), timeout=60),
        )
    assert scored.masked_copies == len(WILD_TYPE)
    assert to_numpy(logits.logits.sequence).shape == (12, 64)


async def test_pseudo_log_likelihood_unary_and_stream(model):
    sequences = {"a": WILD_TYPE[:15], "b": WILD_TYPE[5:30], "bad": "MK1T", "c": "MKTAYIAKQR"}
    async with running_server(model, server_config()) as running:
        one = await running.stub.PseudoLogLikelihood(
            pb.PseudoLogLikelihoodRequest(id="x", protein=pb.ESMProtein(sequence=sequences["a"])),
            timeout=60,
        )
        requests = [
            pb.PseudoLogLikelihoodRequest(id=k, protein=pb.ESMProtein(sequence=s))
            for k, s in sequences.items()
        ]
        streamed = {r.id: r async for r in running.stub.PseudoLogLikelihoodStream(iter(requests))}
    expected = scoring.pseudo_log_likelihood(model, sequences["a"])
    assert one.id == "x" and one.masked_copies == 15
    assert one.pseudo_log_likelihood == pytest.approx(expected.pseudo_log_likelihood, rel=1e-5)
    assert one.pseudo_perplexity == pytest.approx(expected.pseudo_perplexity, rel=1e-5)
    assert_equal_scores(to_numpy(one.log_probs), expected.position_log_probs)
    assert set(streamed) == set(sequences)
    assert streamed["bad"].error.code == "INVALID_ARGUMENT"
    assert "'1'" in streamed["bad"].error.message
    for key in ("a", "b", "c"):
        assert not streamed[key].HasField("error")
        want = scoring.pseudo_log_likelihood(model, sequences[key]).pseudo_log_likelihood
        assert streamed[key].pseudo_log_likelihood == pytest.approx(want, rel=1e-5)
        assert to_numpy(streamed[key].log_probs).shape == (len(sequences[key]),)


async def test_pll_stream_is_a_keyed_stream_like_embed(model):
    """The PLL stream shares Embed's keyed-stream rules: ids unique within the stream and
    bounded in length (an error item for that id, the stream goes on), and it is counted per
    item in the metrics."""
    good = pb.ESMProtein(sequence="MKTAYIAKQR")
    requests = [
        pb.PseudoLogLikelihoodRequest(id="p", protein=good),
        pb.PseudoLogLikelihoodRequest(id="p", protein=good),
        pb.PseudoLogLikelihoodRequest(id="x" * 1025, protein=good),
        pb.PseudoLogLikelihoodRequest(id="q", protein=good),
    ]
    async with running_server(model, server_config()) as running:
        answers = [r async for r in running.stub.PseudoLogLikelihoodStream(iter(requests))]
        counted = running.scrape()
    errors = {r.id: r.error for r in answers if r.HasField("error")}
    ok = sorted(r.id for r in answers if not r.HasField("error"))
    assert len(answers) == 4 and ok == ["p", "q"]
    assert errors["p"].code == "INVALID_ARGUMENT"
    assert "id 'p' was already used in this stream; ids must be unique" in errors["p"].message
    assert errors["x" * 1024].code == "INVALID_ARGUMENT"  # the echoed id is cut to the limit
    assert "id: 1025 characters; the limit is 1024" in errors["x" * 1024].message
    method = ("method", "PseudoLogLikelihoodStream")
    assert counted[("esmc_requests_total", (("code", "OK"), method))] == 2
    assert counted[("esmc_requests_total", (("code", "INVALID_ARGUMENT"), method))] == 2


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(variants=["A1"]), "variant 'A1': cannot parse 'A1'"),
        (dict(variants=[f"{WILD_TYPE[0]}1A", "Q"]), "variant 'Q': cannot parse"),
        (
            dict(variants=[f"W2{WILD_TYPE[1]}" if WILD_TYPE[1] != "W" else "A2C"]),
            "does not match the sequence",
        ),
        (dict(variants=[f"{WILD_TYPE[0]}38A"]), "position 38 is out of range"),
        (dict(variants=[f"{WILD_TYPE[0]}1B"]), "'B' is not an amino acid"),
        (dict(variants=[f"{WILD_TYPE[0]}1*"]), "'*' is not an amino acid"),
        (dict(variants=[f"{WILD_TYPE[0]}137A"], offset=99), "numbered 100..136"),
        (dict(wild_type="MK_T", variants=[]), "without masks"),
        (dict(wild_type="MK1T", variants=[]), "invalid character '1'"),
        (dict(method=7), "method: unknown value 7"),
        (dict(method=pb.WT_MARGINALS, joint_masking=True), "joint_masking applies to"),
        (
            dict(method=pb.PSEUDO_LIKELIHOOD),
            "6 variant(s) by pseudo-likelihood need 259 masked copies (one sequence forward "
            "each); the limit is 50 per request",
        ),
        (
            dict(wild_type=WILD_TYPE * 2, variants=[], include_saturation_map=True),
            "0 variant(s) by masked-marginals need 74 masked copies",
        ),
    ],
)
async def test_invalid_requests_name_the_problem(model, fields, message):
    wild_type = fields.pop("wild_type", WILD_TYPE)
    fields.setdefault("variants", VARIANTS)
    config = dataclasses.replace(server_config(), max_score_forwards=50)
    async with running_server(model, config) as running:
        before = running.engine.stats.sequences
        with pytest.raises(grpc.aio.AioRpcError) as info:
            request = score_request(wild_type=wild_type, **fields)
            await running.stub.ScoreVariants(request, timeout=30)
        assert running.engine.stats.sequences == before  # rejected before any forward
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in info.value.details()


async def test_pseudo_log_likelihood_limit(model):
    config = dataclasses.replace(server_config(), max_score_forwards=10)
    async with running_server(model, config) as running:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await running.stub.PseudoLogLikelihood(
                pb.PseudoLogLikelihoodRequest(protein=pb.ESMProtein(sequence=WILD_TYPE)), timeout=30
            )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "37 residues needs 37 masked copies; the limit is 10" in info.value.details()
    assert "--max-score-forwards" in info.value.details()


def test_forwards_limit_setting_env_and_flag():
    from esmc_server.cli import build_parser, config_from_args
    from esmc_server.config import ServerConfig

    assert ServerConfig().max_score_forwards == 20000
    assert ServerConfig.from_env({"ESMC_MAX_SCORE_FORWARDS": "7"}).max_score_forwards == 7
    args = build_parser().parse_args(["--max-score-forwards", "9"])
    assert config_from_args(args).max_score_forwards == 9
    with pytest.raises(ValueError, match="max_score_forwards must be >= 1"):
        ServerConfig(max_score_forwards=0)
