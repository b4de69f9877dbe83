"""ScoreVariants, PseudoLogLikelihood and PseudoLogLikelihoodStream.

A request becomes an :class:`esmc.scoring.ScoringPlan` (validated first: every bad variant
answers ``INVALID_ARGUMENT`` naming it, and so does a plan over the forwards limit); its masked
copies then go through ``engine.logits`` as ordinary work items, so they share the batcher's
token-budget forwards with Logits, Embed and generation steps. A request keeps at most a
window of copies queued (about two forwards' worth, and never more than a quarter of the
queue), so one big request cannot fill the queue. Each copy's logits are reduced at once to
the few log-probability rows the scores need; the final reduce runs off the event loop.

:class:`ScoringMethods` is mixed into the servicer (it uses the servicer's ``_ready``,
``_unary``, ``_keyed_stream``, ``_build``, ``_max_tokens`` and ``_config``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time

from esmc import scoring
from esmc.types import LogitsConfig
from esmc_proto.v1 import esmc_pb2 as pb
from esmc_server import convert
from esmc_server.config import BatchingConfig
from esmc_server.errors import InvalidRequest


SEQUENCE_LOGITS = LogitsConfig(sequence=True)
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


# -- running a plan on the engine -----------------------------------------------------------


def copy_window(batching: BatchingConfig, tokens_per_copy: int) -> int:
    """Copies one request keeps queued: two forwards' worth, at most a quarter of the queue."""
    per_forward = min(batching.max_batch_size, batching.max_batch_tokens // tokens_per_copy)
    return max(1, min(2 * max(1, per_forward), batching.max_queue // 4))


@dataclasses.dataclass
class _Served:
    """How the copies of one request were served (for its ResponseMetadata)."""

    start: float = dataclasses.field(default_factory=time.perf_counter)
    queue_ms: float = 0.0
    batch_size: int = 0
    batch_tokens: int = 0
    passes: dict = dataclasses.field(default_factory=dict)

    def add(self, timing) -> None:
        self.queue_ms = max(self.queue_ms, timing.queue_ms)
        self.batch_size = max(self.batch_size, timing.batch_size)
        self.batch_tokens = max(self.batch_tokens, timing.batch_tokens)
        # copies served by one forward share its timing (same compute time and batch)
        key = (timing.compute_ms, timing.batch_size, timing.batch_tokens)
        self.passes[key] = timing.forwards

    def metadata(self) -> pb.ResponseMetadata:
        return pb.ResponseMetadata(
            queue_ms=self.queue_ms,
            compute_ms=(time.perf_counter() - self.start) * 1000.0,
            batch_size=self.batch_size,
            batch_tokens=self.batch_tokens,
            forwards=sum(self.passes.values()),
        )


async def run_plan(
    engine, plan: scoring.ScoringPlan, batching: BatchingConfig, deadline: float | None
) -> tuple[scoring.ScoringResult, _Served]:
    """Every copy through ``engine.logits`` (a bounded window at a time), then the reduce."""
    served = _Served()
    reads: list = [None] * len(plan.copies)
    todo = iter(range(len(plan.copies)))
    length = len(plan.wild_type) + 2

    async def worker() -> None:
        for k in todo:
            tokens = await _off_loop_if_large(length, plan.tokens, k)
            result = await engine.logits(tokens, SEQUENCE_LOGITS, deadline=deadline)
            served.add(result.timing)
            logits = result.output.logits.sequence
            reads[k] = await _off_loop_if_large(len(plan.copies[k].reads), plan.read, k, logits)

    window = min(len(plan.copies), copy_window(batching, length))
    async with asyncio.TaskGroup() as group:  # one failure cancels the other workers
        for _ in range(window):
            group.create_task(worker())
    return await asyncio.to_thread(plan.reduce, reads), served


def _first_error(group: BaseExceptionGroup) -> BaseException:
    while isinstance(group, BaseExceptionGroup):
        group = group.exceptions[0]
    return group


async def _run(engine, plan, batching, deadline):
    try:
        return await run_plan(engine, plan, batching, deadline)
    except* Exception as group:  # e.g. DeadlineExceeded, QueueFull: the first one answers
        raise _first_error(group) from None


PLAN_ON_LOOP_ITEMS = 2048
"""Variants plus residues a plan may have and still be built on the event loop (a few ms);
larger plans are built in a thread so that they never hold the loop."""


async def _off_loop_if_large(items: int, build, *args):
    if items <= PLAN_ON_LOOP_ITEMS:
        return build(*args)
    return await asyncio.to_thread(build, *args)


# -- responses -----------------------------------------------------------------------------


def score_response(
    plan: scoring.ScoringPlan, result: scoring.ScoringResult, served: _Served
) -> pb.ScoreVariantsResponse:
    response = pb.ScoreVariantsResponse(
        scores=convert.tensor_to_proto(result.scores),
        masked_copies=len(plan.copies),
        metadata=served.metadata(),
    )
    if result.saturation_map is not None:
        response.saturation_map.CopyFrom(convert.tensor_to_proto(result.saturation_map))
        response.saturation_columns = scoring.AMINO_ACIDS
    return response


def pll_response(
    request_id: str, plan: scoring.ScoringPlan, result: scoring.ScoringResult, served: _Served
) -> pb.PseudoLogLikelihoodResponse:
    return pb.PseudoLogLikelihoodResponse(
        id=request_id,
        pseudo_log_likelihood=result.pseudo_log_likelihood,
        pseudo_perplexity=result.pseudo_perplexity,
        log_probs=convert.tensor_to_proto(result.position_log_probs),
        masked_copies=len(plan.copies),
        metadata=served.metadata(),
    )


# -- the servicer methods ------------------------------------------------------------------


class ScoringMethods:
    """The scoring RPCs of ``ESMCServicer`` (a mixin over its plumbing)."""

    async def ScoreVariants(self, request: pb.ScoreVariantsRequest, context):
        async def handler():
            ready = self._ready
            plan = await _off_loop_if_large(
                len(request.variants) + len(request.wild_type.sequence),
                score_plan, request, self._max_tokens, self._config.max_score_forwards,
            )
            result, served = await _run(
                ready.engine, plan, self._config.batching, convert.deadline_of(context)
            )
            return score_response(plan, result, served)

        return await self._unary("ScoreVariants", context, handler)

    async def PseudoLogLikelihood(self, request: pb.PseudoLogLikelihoodRequest, context):
        async def handler():
            return await self._pll_one(request, convert.deadline_of(context))

        return await self._unary("PseudoLogLikelihood", context, handler)

    async def _pll_one(self, request, deadline) -> pb.PseudoLogLikelihoodResponse:
        ready = self._ready
        plan = await _off_loop_if_large(
            len(request.protein.sequence),
            pll_plan, request, self._max_tokens, self._config.max_score_forwards,
        )
        result, served = await _run(ready.engine, plan, self._config.batching, deadline)
        return pll_response(request.id, plan, result, served)

    async def PseudoLogLikelihoodStream(self, request_iterator, context) -> None:
        """A keyed stream (the servicer's, as Embed): one response per request, in completion
        order, each with its id; at most ``PLL_STREAM_WINDOW`` proteins scored and unwritten."""
        await self._keyed_stream(
            "PseudoLogLikelihoodStream", request_iterator, context, self._pll_stream_one,
            pb.PseudoLogLikelihoodResponse, PLL_STREAM_WINDOW,
        )

    async def _pll_stream_one(self, request, deadline) -> bytes:
        response = await self._pll_one(request, deadline)
        return await self._build(pb.PseudoLogLikelihoodResponse.SerializeToString, response)
