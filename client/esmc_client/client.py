"""``ESMCClient``, the blocking client of the esmc.v1 service (its asyncio twin:
:class:`~esmc_client.aio.AsyncESMCClient`, re-exported here).

Both are context managers and share request building (:mod:`esmc_client.requests`),
response parsing (:mod:`esmc_client.responses`), the constructor and channel settings
(:mod:`esmc_client.client_base`) and bulk-embed bookkeeping (:mod:`esmc_client.bulk`).
Failed calls raise :class:`ESMCError` whose ``code`` is the gRPC status name; bulk
``embed`` instead reports each sequence's error in its :class:`EmbedResult`. ``timeout``
arguments are per-call deadlines in seconds (``None``: no deadline).

    with ESMCClient("127.0.0.1:50051") as client:
        out = client.logits("MKTLLV", LogitsConfig(sequence=True, return_embeddings=True))
        out.logits.sequence.shape  # (8, 64)
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc

from esmc_client import requests as rq
from esmc_client import responses as rs
from esmc_client.aio import AsyncESMCClient
from esmc_client.bulk import EmbedChunk, progress_bar
from esmc_client.client_base import ClientBase, final_protein, generation_jobs, sequence_text
from esmc_client.replay import GenerationReplay, replay_seed
from esmc_client.requests import ProteinLike
from esmc_client.scoring import ScoringCalls
from esmc_client.types import (
    EmbedResult,
    ESMCError,
    ESMProtein,
    ForwardAndSampleOutput,
    GenerateStep,
    LogitsOutput,
    ServerInfo,
)
from esmc_proto.v1 import esmc_pb2 as pb

__all__ = ["AsyncESMCClient", "ESMCClient"]

_POLL_S = 0.05  # how often a blocked Embed request iterator checks that its stream is still open


class ESMCClient(ScoringCalls, ClientBase):
    """Blocking client.

    Args:
        target: ``host:port``, or e.g. ``dns:///esmc.internal:50051`` to balance over every
            address the name resolves to (round robin).
        max_message_bytes: send and receive limit (the server's default: 512 MiB).
        retry: backoff with jitter, retry budget and restart ride-out for ``UNAVAILABLE`` and
            ``RESOURCE_EXHAUSTED`` (:mod:`esmc_client.retry`; ``RetryPolicy(max_retries=0)``
            turns retries off). Other errors are never retried.
        credentials: ready-made channel credentials (instead of the TLS arguments below).
        wait_for_ready: calls wait for the server to come up instead of failing at once.
        options: extra gRPC channel arguments.
        token: sent as ``authorization: Bearer <token>`` with every call.
        tls: TLS channel (default: when any certificate argument is given).
        root_certificates: PEM (bytes or a path) of the CA that signed the server's
            certificate; ``None`` with ``tls=True``: the system's roots.
        client_certificate, client_key: PEM (bytes or paths) for mutual TLS.
    """

    def _open_channel(self, target: str, credentials, options: list) -> grpc.Channel:
        if credentials is None:
            return grpc.insecure_channel(target, options=options)
        return grpc.secure_channel(target, credentials, options=options)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> ESMCClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _unary(self, method, request, timeout: float | None, model: str | None = None):
        asked = self._ask(request, model)
        retries = self._retries(timeout)
        while True:
            try:
                response = method(request, **self._kwargs(retries.remaining()))
                rs.check_answer(asked, response)
                return response
            except grpc.RpcError as rpc:
                error = rs.rpc_error(rpc, retries.attempts)
                if (definitive := self._transport_error(error)) is not None:
                    raise definitive from rpc
                delay = retries.next_delay(error.code, error.message, error.pushback_ms)
                if delay is None:
                    raise error from rpc
            time.sleep(delay)

    # --- unary calls ----------------------------------------------------------------------

    def info(self, *, model: str | None = None, timeout: float | None = None) -> ServerInfo:
        return rs.parse_info(self._unary(self._stub.Info, pb.InfoRequest(), timeout, model))

    def encode(self, protein: ProteinLike, *, timeout: float | None = None):
        """Sequence -> token ids (``<cls> ... <eos>``), an int64 array."""
        request = pb.EncodeRequest(protein=pb.ESMProtein(sequence=sequence_text(protein)))
        return rs.parse_encode(self._unary(self._stub.Encode, request, timeout))

    def decode(self, tokens, *, timeout: float | None = None) -> ESMProtein:
        """Token ids -> protein (mask written as ``_``)."""
        request = pb.DecodeRequest(tokens=rq.token_message(tokens))
        return rs.parse_decode(self._unary(self._stub.Decode, request, timeout))

    def logits(
        self,
        protein: ProteinLike,
        config: Any = None,
        *,
        output_dtype: str = "float32",
        model: str | None = None,
        timeout: float | None = None,
    ) -> LogitsOutput:
        """One protein's outputs; ``config`` a :class:`LogitsConfig` (None: logits only)."""
        request = rq.logits_request(protein, config, output_dtype)
        return rs.parse_logits(self._unary(self._stub.Logits, request, timeout, model))

    def forward_and_sample(
        self,
        protein: ProteinLike,
        sampling_config: Any = None,
        *,
        seed: int | None = None,
        output_dtype: str = "float32",
        model: str | None = None,
        timeout: float | None = None,
    ) -> ForwardAndSampleOutput:
        request = rq.forward_and_sample_request(protein, sampling_config, seed, output_dtype)
        return rs.parse_forward_and_sample(
            self._unary(self._stub.ForwardAndSample, request, timeout, model)
        )

    # --- generation -----------------------------------------------------------------------

    def generate_stream(
        self,
        protein: ProteinLike,
        config: Any = None,
        seed: int | None = None,
        *,
        model: str | None = None,
        timeout: float | None = None,
    ) -> Iterator[GenerateStep]:
        """Yield each step (``step`` 1..``num_steps``), then the final message (``final``,
        ``step`` None); closing the iterator cancels the call.

        ``timeout`` is a deadline for the whole stream. A call refused before its first
        message is retried like a unary call; so is one whose server goes away mid-stream:
        the same seeded request is sent again, possibly to another replica, and the steps
        already yielded are skipped (:mod:`esmc_client.replay`). Without a ``seed`` the
        client picks one so that this is possible.
        """
        request = rq.generate_request(protein, config, replay_seed(seed))
        asked = self._ask(request, model)
        retries = self._retries(timeout)
        replay = GenerationReplay()
        while True:
            call = self._stub.Generate(request, **self._kwargs(retries.remaining()))
            try:
                for message in call:
                    rs.check_model(asked, message.metadata.model)
                    step = rs.parse_generate(message)
                    if replay.accept(step):
                        yield step
                return
            except grpc.RpcError as rpc:
                error = rs.rpc_error(rpc, retries.attempts)
                if (definitive := self._transport_error(error)) is not None:
                    raise definitive from rpc
                delay = retries.next_delay(error.code, error.message, error.pushback_ms)
                if delay is None:
                    raise error from rpc
                replay.resuming(error, retries.attempts)
            finally:
                call.cancel()
            time.sleep(delay)

    def generate(
        self,
        protein: ProteinLike,
        config: Any = None,
        seed: int | None = None,
        *,
        model: str | None = None,
        timeout: float | None = None,
    ) -> ESMProtein:
        """The finished protein of an iterative generation."""
        return final_protein(self.generate_stream(protein, config, seed, model=model, timeout=timeout))

    def batch_generate(
        self,
        proteins: Sequence[ProteinLike],
        config: Any = None,
        seeds: Sequence[int | None] | None = None,
        *,
        concurrency: int = 16,
        timeout: float | None = None,
        return_exceptions: bool = False,
    ) -> list[ESMProtein | ESMCError]:
        """Generate from many prompts at once (the server batches their steps together).

        ``config`` is one config for all or one per protein. With ``return_exceptions`` a
        failed prompt's entry is its :class:`ESMCError`; otherwise the first error is raised.
        """
        jobs = generation_jobs(proteins, config, seeds)

        def run(job):
            try:
                return self.generate(*job, timeout=timeout)
            except ESMCError as error:
                if return_exceptions:
                    return error
                raise

        with ThreadPoolExecutor(max_workers=max(1, min(concurrency, len(jobs) or 1))) as pool:
            return list(pool.map(run, jobs))

    # --- bulk embedding -------------------------------------------------------------------

    def embed(
        self,
        sequences: Iterable[ProteinLike] | Mapping[str, ProteinLike],
        layer: int | None = -1,
        pool: str | None = "mean",
        *,
        output_dtype: str = "float32",
        batch_size: int = 256,
        concurrency: int = 4,
        max_in_flight: int = 64,
        progress: bool = False,
        model: str | None = None,
        timeout: float | None = None,
    ) -> list[EmbedResult]:
        """Embed many proteins over ``Embed`` streams; one result per input, in input order.

        Args:
            sequences: proteins, ``(id, protein)`` pairs, or a mapping id -> protein; bare
                proteins get their position (``"0"``, ``"1"``, ...) as id.
            layer: -1 (or None) final embeddings, 0..n-1 a block's output, -2.. from the end.
            pool: ``"mean"`` over residues (d), or ``"none"`` per position (L+2, d).
            batch_size: sequences per stream; ``concurrency``: streams at once;
                ``max_in_flight``: requests sent ahead of their answers on one stream.
            progress: show a tqdm progress bar.
            timeout: deadline of each stream.

        A sequence's own error (``INVALID_ARGUMENT``...) is reported in its result and the
        sequence is never sent again. A server that is unreachable or restarting is waited
        for up to ``self.retry.ride_out_s`` seconds (30 by default) and the unanswered
        sequences are resent; a sequence refused for a full queue is resent after a backoff,
        within the retry budget (:mod:`esmc_client.bulk`).
        """
        items, chunks = self._embed_chunks(
            sequences, batch_size, max_in_flight, layer=layer, pool=pool, output_dtype=output_dtype,
            model=self.model if model is None else model,
        )
        results: list[EmbedResult | None] = [None] * len(items)
        lock = threading.Lock()
        with progress_bar(progress, len(items), "embed") as bar:

            def record(done: list[tuple[int, EmbedResult]]) -> None:
                with lock:
                    for index, result in done:
                        results[index] = result
                    bar.update(len(done))

            def run(chunk: EmbedChunk) -> None:
                self._run_chunk(chunk, record, timeout)

            with ThreadPoolExecutor(max_workers=max(1, min(concurrency, len(chunks) or 1))) as ex:
                for future in [ex.submit(run, chunk) for chunk in chunks]:
                    future.result()
        return results  # type: ignore[return-value]

    def _run_chunk(self, chunk: EmbedChunk, record, timeout) -> None:
        while requests := chunk.to_send():
            error = None
            try:
                for message in self._embed_stream(requests, chunk.window, timeout):
                    if (done := chunk.on_response(message)) is not None:
                        record([done])
            except grpc.RpcError as rpc:
                error = rs.rpc_error(rpc)
                if (definitive := self._transport_error(error)) is not None:
                    raise definitive from rpc
            record(chunk.on_stream_end(error))
            if (wait := chunk.next_wait()) is None:
                return
            delay, until_ready = wait
            time.sleep(delay)
            if until_ready:
                self._wait_ready(chunk.ride_out_left())

    def _wait_ready(self, timeout: float) -> None:
        """Wait (at most ``timeout`` s) for the channel to connect to a server."""
        try:
            grpc.channel_ready_future(self._channel).result(timeout=max(timeout, 0.01))
        except grpc.FutureTimeoutError:
            pass

    def _embed_stream(self, requests, max_in_flight: int, timeout) -> Iterator[pb.EmbedResponse]:
        """One Embed stream, at most ``max_in_flight`` requests ahead of their responses."""
        window = threading.Semaphore(max(1, max_in_flight))
        closed = threading.Event()

        def send():
            for request in requests:
                while not window.acquire(timeout=_POLL_S):
                    if closed.is_set():
                        return
                yield request

        call = self._stub.Embed(send(), **self._kwargs(timeout))
        try:
            for message in call:
                window.release()
                yield message
        finally:
            closed.set()
            call.cancel()

