"""Variant scores and pseudo-log-likelihoods: requests, responses, and the client methods.

``ScoringCalls`` and ``AsyncScoringCalls`` are mixed into :class:`ESMCClient` and
:class:`AsyncESMCClient` (they use the clients' ``_stub``, ``_unary`` and ``_kwargs``)::

    with ESMCClient("127.0.0.1:50051") as client:
        scores = client.score_variants("MKTAYIAK", ["K2P", "K2P:A4D"])  # (2,) float32
        table = client.saturation_map("MKTAYIAK")  # (8, 20), columns AMINO_ACIDS
        results = client.pseudo_log_likelihood(["MKTAYIAK", "MLLV"])

Methods: ``"masked-marginals"`` (default), ``"wt-marginals"``, ``"pseudo-likelihood"``;
normalizations: ``"full"`` (log_softmax over the 64 logits, default) or ``"amino-acids"``.
Positions are 1-based; ``offset`` is subtracted from each. See the README for the definitions.

A pseudo-log-likelihood stream of many proteins follows the rules of bulk ``embed``
(:mod:`esmc_client.bulk`): when the stream breaks with ``UNAVAILABLE`` (a server restarting,
draining or killed) the proteins still without an answer are sent again on a new stream, for
as long as the outage lasts less than ``RetryPolicy.ride_out_s``; each protein is answered
once, and a definitive error (``INVALID_ARGUMENT``...) is never sent again.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

import grpc
import numpy as np

from esmc_client import responses as rs
from esmc_client.bulk import EmbedChunk
from esmc_proto.v1 import esmc_pb2 as pb
from esmc_client.tensors import to_numpy
from esmc_client.types import (
    AMINO_ACIDS,
    SCORING_METHODS,
    SCORING_NORMALIZATIONS,
    ESMCError,
    ResponseMetadata,
)

METHODS = dict(
    zip(SCORING_METHODS, (pb.MASKED_MARGINALS, pb.WT_MARGINALS, pb.PSEUDO_LIKELIHOOD))
)
NORMALIZATIONS = dict(
    zip(SCORING_NORMALIZATIONS, (pb.NORMALIZATION_FULL, pb.NORMALIZATION_AMINO_ACIDS))
)


@dataclass(frozen=True)
class VariantScores:
    scores: np.ndarray  # (variants,) float32, input order
    saturation_map: np.ndarray | None  # (L, 20) when asked for
    columns: str  # column order of saturation_map
    masked_copies: int  # sequence forwards the request needed on the server
    metadata: ResponseMetadata


@dataclass(frozen=True)
class PseudoLogLikelihood:
    id: str
    pseudo_log_likelihood: float | None
    pseudo_perplexity: float | None
    log_probs: np.ndarray | None  # (L,) log p(s_i | s, i masked)
    error: ESMCError | None = None
    metadata: ResponseMetadata | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


# -- requests and responses ------------------------------------------------------------------


def _sequence(protein: Any) -> str:
    sequence = getattr(protein, "sequence", protein)
    if not isinstance(sequence, str):
        raise ValueError("scoring takes a protein sequence string (or an object with .sequence)")
    return sequence


def _enum(table: dict, value: str, what: str) -> int:
    if value not in table:
        raise ValueError(f"unknown {what} {value!r}; use one of {', '.join(table)}")
    return table[value]


def score_request(
    wild_type: Any,
    variants: Iterable[str],
    method: str = "masked-marginals",
    *,
    offset: int = 0,
    joint_masking: bool = False,
    normalization: str = "full",
    saturation_map: bool = False,
) -> pb.ScoreVariantsRequest:
    return pb.ScoreVariantsRequest(
        wild_type=pb.ESMProtein(sequence=_sequence(wild_type)),
        variants=list(variants),
        method=_enum(METHODS, method, "method"),
        offset=int(offset),
        joint_masking=bool(joint_masking),
        normalization=_enum(NORMALIZATIONS, normalization, "normalization"),
        include_saturation_map=bool(saturation_map),
    )


def parse_scores(message: pb.ScoreVariantsResponse) -> VariantScores:
    return VariantScores(
        scores=to_numpy(message.scores),
        saturation_map=rs.optional_tensor(message, "saturation_map"),
        columns=message.saturation_columns or AMINO_ACIDS,
        masked_copies=message.masked_copies,
        metadata=rs.parse_metadata(message.metadata),
    )


def pll_request(request_id: str, protein: Any, normalization: str = "full"):
    return pb.PseudoLogLikelihoodRequest(
        id=request_id,
        protein=pb.ESMProtein(sequence=_sequence(protein)),
        normalization=_enum(NORMALIZATIONS, normalization, "normalization"),
    )


def parse_pll(message: pb.PseudoLogLikelihoodResponse) -> PseudoLogLikelihood:
    metadata = rs.parse_metadata(message.metadata)
    if message.HasField("error"):
        error = ESMCError(message.error.code or "UNKNOWN", message.error.message)
        return PseudoLogLikelihood(message.id, None, None, None, error, metadata)
    return PseudoLogLikelihood(
        id=message.id,
        pseudo_log_likelihood=message.pseudo_log_likelihood,
        pseudo_perplexity=message.pseudo_perplexity,
        log_probs=to_numpy(message.log_probs),
        metadata=metadata,
    )


def _many(proteins: Any) -> list[tuple[str, Any]] | None:
    """``(id, protein)`` pairs when ``proteins`` holds many; None for one protein."""
    if isinstance(proteins, str) or hasattr(proteins, "sequence"):
        return None
    if isinstance(proteins, Mapping):
        return [(str(k), v) for k, v in proteins.items()]
    return [
        item if isinstance(item, tuple) and len(item) == 2 else (str(i), item)
        for i, item in enumerate(proteins)
    ]


def _in_input_order(items: list[tuple[str, Any]], results: dict[str, Any]) -> list:
    """Results keyed by wire id (the position) back in input order, with the caller's ids."""
    out = []
    for i, (name, _) in enumerate(items):
        result = results.get(str(i))
        if result is None:
            error = ESMCError("DATA_LOSS", "the stream ended without an answer for this protein")
            result = PseudoLogLikelihood(str(i), None, None, None, error)
        out.append(replace(result, id=name))
    return out


class PllChunk(EmbedChunk):
    """The proteins of one pseudo-log-likelihood stream across its resends (wire id: the
    position)."""

    def __init__(self, requests: list[pb.PseudoLogLikelihoodRequest], client: Any):
        entries = [(int(r.id), r.id, r) for r in requests]
        super().__init__(entries, client.retry, client.retry_budget)

    def _parse(self, message, entry) -> PseudoLogLikelihood:
        return parse_pll(message)

    def _failed(self, entry, error: ESMCError) -> PseudoLogLikelihood:
        return PseudoLogLikelihood(entry.id, None, None, None, error)


# -- client methods ------------------------------------------------------------------------


class ScoringCalls:
    """Scoring methods of the blocking client."""

    def score(self, wild_type: Any, variants: Iterable[str] = (), method: str = "masked-marginals",
              *, offset: int = 0, joint_masking: bool = False, normalization: str = "full",
              saturation_map: bool = False, timeout: float | None = None) -> VariantScores:
        """Scores, the optional site-saturation map and how the server served them."""
        request = score_request(wild_type, variants, method, offset=offset,
                                joint_masking=joint_masking, normalization=normalization,
                                saturation_map=saturation_map)
        return parse_scores(self._unary(self._stub.ScoreVariants, request, timeout))

    def score_variants(self, wild_type: Any, variants: Iterable[str],
                       method: str = "masked-marginals", **options) -> np.ndarray:
        """One score per variant (float32, input order); options as :meth:`score`."""
        return self.score(wild_type, variants, method, **options).scores

    def saturation_map(self, wild_type: Any, method: str = "masked-marginals",
                       **options) -> np.ndarray:
        """(L, 20) ``log p(aa | context) - log p(wt | context)``, columns :data:`AMINO_ACIDS`."""
        return self.score(wild_type, (), method, saturation_map=True, **options).saturation_map

    def pseudo_log_likelihood(self, proteins: Any, *, normalization: str = "full",
                              timeout: float | None = None):
        """One protein -> :class:`PseudoLogLikelihood` (errors raise :class:`ESMCError`);
        many (a list, ``(id, protein)`` pairs or a mapping) -> a list in input order over one
        stream, each with its own ``error``."""
        items = _many(proteins)
        if items is None:
            request = pll_request("", proteins, normalization)
            return parse_pll(self._unary(self._stub.PseudoLogLikelihood, request, timeout))
        requests = [pll_request(str(i), p, normalization) for i, (_, p) in enumerate(items)]
        _ask_all(self, requests)  # answers naming another model: EmbedChunk.on_response refuses
        chunk = PllChunk(requests, self)
        results: dict[str, PseudoLogLikelihood] = {}
        while requests := chunk.to_send():
            error = None
            try:
                for message in self._pll_stream(requests, timeout):
                    if (done := chunk.on_response(message)) is not None:
                        results[str(done[0])] = done[1]
            except grpc.RpcError as rpc:
                error = rs.rpc_error(rpc)
                if (definitive := self._transport_error(error)) is not None:
                    raise definitive from rpc
            results.update((str(i), result) for i, result in chunk.on_stream_end(error))
            if (wait := chunk.next_wait()) is None:
                break
            delay, until_ready = wait
            time.sleep(delay)
            if until_ready:
                self._wait_ready(chunk.ride_out_left())
        return _in_input_order(items, results)

    def _pll_stream(self, requests: list, timeout) -> Iterator[pb.PseudoLogLikelihoodResponse]:
        call = self._stub.PseudoLogLikelihoodStream(iter(requests), **self._kwargs(timeout))
        try:
            yield from call
        finally:
            call.cancel()


class AsyncScoringCalls:
    """Scoring methods of the asyncio client (see :class:`ScoringCalls`)."""

    async def score(self, wild_type: Any, variants: Iterable[str] = (),
                    method: str = "masked-marginals", *, offset: int = 0,
                    joint_masking: bool = False, normalization: str = "full",
                    saturation_map: bool = False, timeout: float | None = None) -> VariantScores:
        request = score_request(wild_type, variants, method, offset=offset,
                                joint_masking=joint_masking, normalization=normalization,
                                saturation_map=saturation_map)
        return parse_scores(await self._unary(self._stub.ScoreVariants, request, timeout))

    async def score_variants(self, wild_type: Any, variants: Iterable[str],
                             method: str = "masked-marginals", **options) -> np.ndarray:
        return (await self.score(wild_type, variants, method, **options)).scores

    async def saturation_map(self, wild_type: Any, method: str = "masked-marginals",
                             **options) -> np.ndarray:
        result = await self.score(wild_type, (), method, saturation_map=True, **options)
        return result.saturation_map

    async def pseudo_log_likelihood(self, proteins: Any, *, normalization: str = "full",
                                    timeout: float | None = None):
        items = _many(proteins)
        if items is None:
            request = pll_request("", proteins, normalization)
            return parse_pll(await self._unary(self._stub.PseudoLogLikelihood, request, timeout))
        requests = [pll_request(str(i), p, normalization) for i, (_, p) in enumerate(items)]
        _ask_all(self, requests)  # answers naming another model: EmbedChunk.on_response refuses
        chunk = PllChunk(requests, self)
        results: dict[str, PseudoLogLikelihood] = {}
        while requests := chunk.to_send():
            error = None
            try:
                stream = self._bidi_stream(self._stub.PseudoLogLikelihoodStream, requests,
                                           None, timeout)
                async with contextlib.aclosing(stream):
                    async for message in stream:
                        if (done := chunk.on_response(message)) is not None:
                            results[str(done[0])] = done[1]
            except grpc.RpcError as rpc:
                error = rs.rpc_error(rpc)
                if (definitive := await self._transport_error_async(error)) is not None:
                    raise definitive from rpc
            results.update((str(i), result) for i, result in chunk.on_stream_end(error))
            if (wait := chunk.next_wait()) is None:
                break
            delay, until_ready = wait
            await asyncio.sleep(delay)
            if until_ready:
                await self._wait_ready(chunk.ride_out_left())
        return _in_input_order(items, results)


def _ask_all(client, requests: list) -> str:
    """Name the client's model in every request; the name asked ("" for the default)."""
    asked = ""
    for request in requests:
        asked = client._ask(request, None)
    return asked
