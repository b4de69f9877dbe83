"""ScoreVariants, PseudoLogLikelihood and PseudoLogLikelihoodStream.

A request becomes an :class:`esmc.scoring.ScoringPlan` (validated first: every bad variant
answers ``INVALID_ARGUMENT`` naming it, and so does a plan over the forwards limit), then a
:class:`esmc_server.calls.ScoreCall` that ``engine.score`` runs: its masked copies share the
batcher's token-budget forwards with Logits, Embed and generation steps
(:mod:`esmc_server.score_run`).

:class:`ScoringMethods` is mixed into the servicer (it uses the servicer's ``_serving``,
``_unary``, ``_keyed_stream``, ``_build``, ``_max_tokens`` and ``_config``).
"""

from __future__ import annotations

from esmc import scoring
from esmc_proto.v1 import esmc_pb2 as pb
from esmc_server import convert
from esmc_server.calls import Caller, score_call
from esmc_server.errors import InvalidRequest
from esmc_server.requests import Timing
from esmc_server.score_run import off_loop_if_large

PLL_STREAM_WINDOW = 4
"""Proteins of one PseudoLogLikelihoodStream scored at once; reading pauses beyond it."""
METHODS = {
    pb.SCORING_METHOD_UNSPECIFIED: "masked-marginals",
    pb.WT_MARGINALS: "wt-marginals",
    pb.MASKED_MARGINALS: "masked-marginals",
    pb.PSEUDO_LIKELIHOOD: "pseudo-likelihood",
}
NORMALIZATIONS = {
    pb.NORMALIZATION_UNSPECIFIED: "full",
    pb.NORMALIZATION_FULL: "full",
    pb.NORMALIZATION_AMINO_ACIDS: "amino-acids",
}
LIMIT_HINT = "(server setting --max-score-forwards / ESMC_MAX_SCORE_FORWARDS)"


# -- requests -> plans ---------------------------------------------------------------------


def _choice(table: dict, value: int, field: str, enum) -> str:
    if value not in table:
        names = ", ".join(enum.keys()[1:])
        raise InvalidRequest(f"{field}: unknown value {value}; use one of {names}")
    return table[value]


def score_plan(
    request: pb.ScoreVariantsRequest, max_length: int, limit: int
) -> scoring.ScoringPlan:
    """The request's plan, or InvalidRequest naming the variant, option or limit at fault."""
    convert.tokens_from_protein(request.wild_type, max_length)  # tracks, characters, length
    method = _choice(METHODS, request.method, "method", pb.ScoringMethod)
    normalization = _choice(
        NORMALIZATIONS, request.normalization, "normalization", pb.Normalization
    )
    if request.joint_masking and method != "masked-marginals":
        raise InvalidRequest(f"joint_masking applies to MASKED_MARGINALS only, not {method}")
    try:
        return scoring.plan_scores(
            request.wild_type.sequence,
            list(request.variants),
            method,
            offset=request.offset,
            joint_masking=request.joint_masking,
            normalization=normalization,
            saturation_map=request.include_saturation_map,
            max_copies=limit,
        )
    except scoring.PlanTooLarge as e:
        raise InvalidRequest(f"{e} {LIMIT_HINT}") from e
    except scoring.VariantError as e:
        raise InvalidRequest(str(e)) from e
    except ValueError as e:
        raise InvalidRequest(f"wild_type: {e}") from e


def pll_plan(
    request: pb.PseudoLogLikelihoodRequest, max_length: int, limit: int
) -> scoring.ScoringPlan:
    convert.tokens_from_protein(request.protein, max_length)
    normalization = _choice(
        NORMALIZATIONS, request.normalization, "normalization", pb.Normalization
    )
    try:
        return scoring.plan_pseudo_log_likelihood(request.protein.sequence, normalization, limit)
    except scoring.PlanTooLarge as e:
        raise InvalidRequest(
            f"a protein of {len(request.protein.sequence)} residues needs {e.copies} masked "
            f"copies; the limit is {e.limit} per request {LIMIT_HINT}"
        ) from e
    except ValueError as e:
        raise InvalidRequest(f"protein: {e}") from e


# -- responses -----------------------------------------------------------------------------


def score_response(
    plan: scoring.ScoringPlan, result: scoring.ScoringResult, timing: Timing
) -> pb.ScoreVariantsResponse:
    response = pb.ScoreVariantsResponse(
        scores=convert.tensor_to_proto(result.scores),
        masked_copies=len(plan.copies),
        metadata=convert.metadata_to_proto(timing),
    )
    if result.saturation_map is not None:
        response.saturation_map.CopyFrom(convert.tensor_to_proto(result.saturation_map))
        response.saturation_columns = scoring.AMINO_ACIDS
    return response


def pll_response(
    request_id: str, plan: scoring.ScoringPlan, result: scoring.ScoringResult, timing: Timing
) -> pb.PseudoLogLikelihoodResponse:
    return pb.PseudoLogLikelihoodResponse(
        id=request_id,
        pseudo_log_likelihood=result.pseudo_log_likelihood,
        pseudo_perplexity=result.pseudo_perplexity,
        log_probs=convert.tensor_to_proto(result.position_log_probs),
        masked_copies=len(plan.copies),
        metadata=convert.metadata_to_proto(timing),
    )


# -- the servicer methods ------------------------------------------------------------------


class ScoringMethods:
    """The scoring RPCs of ``ESMCServicer`` (a mixin over its plumbing: ``_serving``,
    ``_unary``, ``_keyed_stream``, ``_build``, ``_caller``, ``_max_tokens``, ``_config``)."""

    async def ScoreVariants(self, request: pb.ScoreVariantsRequest, context):
        async def handler():
            ready = self._serving(request.model)
            plan = await off_loop_if_large(
                len(request.variants) + len(request.wild_type.sequence),
                score_plan, request, self._max_tokens, self._config.max_score_forwards,
            )
            call = score_call(plan, caller=self._caller(context),
                              deadline=convert.deadline_of(context))
            result, timing = await ready.engine.score(call)
            response = score_response(plan, result, timing)
            response.metadata.MergeFrom(ready.stamp(request.model))
            return response

        return await self._unary("ScoreVariants", context, handler)

    async def PseudoLogLikelihood(self, request: pb.PseudoLogLikelihoodRequest, context):
        async def handler():
            return await self._pll_one(request, convert.deadline_of(context),
                                       self._caller(context))

        return await self._unary("PseudoLogLikelihood", context, handler)

    async def _pll_one(self, request, deadline, caller: Caller) -> pb.PseudoLogLikelihoodResponse:
        ready = self._serving(request.model)
        plan = await off_loop_if_large(
            len(request.protein.sequence),
            pll_plan, request, self._max_tokens, self._config.max_score_forwards,
        )
        call = score_call(plan, caller=caller, deadline=deadline, id=request.id)
        result, timing = await ready.engine.score(call)
        response = pll_response(request.id, plan, result, timing)
        response.metadata.MergeFrom(ready.stamp(request.model))
        return response

    async def PseudoLogLikelihoodStream(self, request_iterator, context) -> None:
        """A keyed stream (the servicer's, as Embed): one response per request, in completion
        order, each with its id; at most ``PLL_STREAM_WINDOW`` proteins scored and unwritten."""
        caller = self._caller(context)

        async def one(request, deadline) -> bytes:
            response = await self._pll_one(request, deadline, caller)
            return await self._build(pb.PseudoLogLikelihoodResponse.SerializeToString, response)

        await self._keyed_stream(
            "PseudoLogLikelihoodStream", request_iterator, context, one,
            pb.PseudoLogLikelihoodResponse, PLL_STREAM_WINDOW,
        )
