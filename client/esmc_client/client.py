"""``ESMCClient`` (blocking) and ``AsyncESMCClient`` (asyncio) for the esmc.v1 service.

Both are context managers and share request building (:mod:`esmc_client.requests`),
response parsing (:mod:`esmc_client.responses`), channel options
(:mod:`esmc_client.channel`) and bulk-embed bookkeeping (:mod:`esmc_client.bulk`).
Failed calls raise :class:`ESMCError` whose ``code`` is the gRPC status name; bulk
``embed`` instead reports each sequence's error in its :class:`EmbedResult`. ``timeout``
arguments are per-call deadlines in seconds (``None``: no deadline).

    with ESMCClient("127.0.0.1:50051") as client:
        out = client.logits("MKTLLV", LogitsConfig(sequence=True, return_embeddings=True))
        out.logits.sequence.shape  # (8, 64)
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import grpc.aio

from esmc_client import requests as rq
from esmc_client import responses as rs
from esmc_proto.v1 import esmc_pb2 as pb
from esmc_proto.v1 import esmc_pb2_grpc as pb_grpc
from esmc_client.bulk import EmbedChunk, make_chunks, progress_bar
from esmc_client.channel import DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_TARGET, channel_options
from esmc_client.replay import GenerationReplay, replay_seed
from esmc_client.scoring import AsyncScoringCalls, ScoringCalls
from esmc_client.security import TransportCheck, auth_metadata, read_pem, tls_credentials
from esmc_client.tracing import trace_metadata
from esmc_client.requests import ProteinLike
from esmc_client.retry import CallRetries, RetryBudget, RetryPolicy
from esmc_client.types import (
    EmbedResult,
    ESMCError,
    ESMProtein,
    ForwardAndSampleOutput,
    GenerateStep,
    LogitsOutput,
    ServerInfo,
)

_POLL_S = 0.05  # how often a blocked Embed request iterator checks that its stream is still open


class _ClientBase:
    """The constructor and channel settings of both clients (see :class:`ESMCClient`)."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        retry: RetryPolicy | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        wait_for_ready: bool = False,
        options: Sequence[tuple[str, Any]] = (),
        token: str | None = None,
        tls: bool | None = None,
        root_certificates: bytes | str | os.PathLike | None = None,
        client_certificate: bytes | str | os.PathLike | None = None,
        client_key: bytes | str | os.PathLike | None = None,
    ):
        self.target = target
        self.retry = retry if retry is not None else RetryPolicy()
        self.retry_budget = RetryBudget(self.retry.budget_ratio, self.retry.budget_burst)
        self._wait_for_ready = wait_for_ready
        self._metadata = auth_metadata(token)
        built = credentials is None
        client_pair = None
        if built:
            root_certificates = read_pem(root_certificates, "root certificates")
            client_certificate = read_pem(client_certificate, "client certificate")
            client_key = read_pem(client_key, "client key")
            credentials = tls_credentials(tls, root_certificates, client_certificate, client_key)
            if client_certificate is not None:
                client_pair = (client_certificate, client_key)
        self._transport = TransportCheck(
            target,
            tls=credentials is not None,
            root_certificates=root_certificates if built else None,
            roots_known=built,
            client_pair=client_pair,
            server_name=dict(options).get("grpc.ssl_target_name_override"),
        )
        channel_args = channel_options(max_message_bytes, tuple(options))
        self._channel = self._open_channel(target, credentials, channel_args)
        self._stub = pb_grpc.ESMCStub(self._channel)

    def _open_channel(self, target: str, credentials, options: list):
        raise NotImplementedError

    def _kwargs(self, timeout: float | None) -> dict[str, Any]:
        metadata = (self._metadata or ()) + trace_metadata()
        return {
            "timeout": timeout,
            "wait_for_ready": self._wait_for_ready,
            "metadata": metadata or None,
        }

    def _transport_error(self, error: ESMCError) -> ESMCError | None:
        """For an ``UNAVAILABLE`` that is really a TLS mismatch (this client and the server
        speak different transports, or one refuses the other's certificate): the error
        saying what to change, never worth a retry (:class:`TransportCheck`); else None.
        Blocking (it may open a connection): the asyncio client runs it in a thread."""
        hint = self._transport.explain(error.code)
        if hint is None:
            return None
        return ESMCError(error.code, f"{error.message}; {hint}", attempts=error.attempts)

    def _retries(self, timeout: float | None) -> CallRetries:
        """Retry state of one call; ``timeout`` covers all its attempts."""
        return CallRetries(self.retry, self.retry_budget, timeout)

    def _embed_chunks(self, sequences, batch_size: int, max_in_flight: int, **request_options):
        """``(items, chunks)`` of a bulk embed, sharing this client's retry budget."""
        items = rq.embed_items(sequences)
        chunks = make_chunks(
            items, batch_size, self.retry, self.retry_budget, max_in_flight, **request_options
        )
        return items, chunks


class ESMCClient(ScoringCalls, _ClientBase):
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

    def _unary(self, method, request, timeout: float | None):
        retries = self._retries(timeout)
        while True:
            try:
                return method(request, **self._kwargs(retries.remaining()))
            except grpc.RpcError as rpc:
                error = rs.rpc_error(rpc, retries.attempts)
                if (definitive := self._transport_error(error)) is not None:
                    raise definitive from rpc
                delay = retries.next_delay(error.code, error.message, error.pushback_ms)
                if delay is None:
                    raise error from rpc
            time.sleep(delay)

    # --- unary calls ----------------------------------------------------------------------

    def info(self, *, timeout: float | None = None) -> ServerInfo:
        return rs.parse_info(self._unary(self._stub.Info, pb.InfoRequest(), timeout))

    def encode(self, protein: ProteinLike, *, timeout: float | None = None):
        """Sequence -> token ids (``<cls> ... <eos>``), an int64 array."""
        request = pb.EncodeRequest(protein=pb.ESMProtein(sequence=_sequence_text(protein)))
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
        timeout: float | None = None,
    ) -> LogitsOutput:
        """One protein's outputs; ``config`` a :class:`LogitsConfig` (None: logits only)."""
        request = rq.logits_request(protein, config, output_dtype)
        return rs.parse_logits(self._unary(self._stub.Logits, request, timeout))

    def forward_and_sample(
        self,
        protein: ProteinLike,
        sampling_config: Any = None,
        *,
        seed: int | None = None,
        output_dtype: str = "float32",
        timeout: float | None = None,
    ) -> ForwardAndSampleOutput:
        request = rq.forward_and_sample_request(protein, sampling_config, seed, output_dtype)
        return rs.parse_forward_and_sample(
            self._unary(self._stub.ForwardAndSample, request, timeout)
        )

    # --- generation -----------------------------------------------------------------------

    def generate_stream(
        self,
        protein: ProteinLike,
        config: Any = None,
        seed: int | None = None,
        *,
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
        retries = self._retries(timeout)
        replay = GenerationReplay()
        while True:
            call = self._stub.Generate(request, **self._kwargs(retries.remaining()))
            try:
                for message in call:
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
        timeout: float | None = None,
    ) -> ESMProtein:
        """The finished protein of an iterative generation."""
        return _final_protein(self.generate_stream(protein, config, seed, timeout=timeout))

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
        jobs = _generation_jobs(proteins, config, seeds)

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
            sequences, batch_size, max_in_flight, layer=layer, pool=pool, output_dtype=output_dtype
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


class AsyncESMCClient(AsyncScoringCalls, _ClientBase):
    """asyncio client (``grpc.aio``), same arguments and methods as :class:`ESMCClient`.

    Create it inside the event loop that uses it.
    """

    def _open_channel(self, target: str, credentials, options: list) -> grpc.aio.Channel:
        if credentials is None:
            return grpc.aio.insecure_channel(target, options=options)
        return grpc.aio.secure_channel(target, credentials, options=options)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncESMCClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def _transport_error_async(self, error: ESMCError) -> ESMCError | None:
        if error.code != "UNAVAILABLE":
            return None
        return await asyncio.to_thread(self._transport_error, error)

    async def _unary(self, method, request, timeout: float | None):
        retries = self._retries(timeout)
        while True:
            try:
                return await method(request, **self._kwargs(retries.remaining()))
            except grpc.aio.AioRpcError as rpc:
                error = rs.rpc_error(rpc, retries.attempts)
                if (definitive := await self._transport_error_async(error)) is not None:
                    raise definitive from rpc
                delay = retries.next_delay(error.code, error.message, error.pushback_ms)
                if delay is None:
                    raise error from rpc
            await asyncio.sleep(delay)

    # --- unary calls ----------------------------------------------------------------------

    async def info(self, *, timeout: float | None = None) -> ServerInfo:
        return rs.parse_info(await self._unary(self._stub.Info, pb.InfoRequest(), timeout))

    async def encode(self, protein: ProteinLike, *, timeout: float | None = None):
        request = pb.EncodeRequest(protein=pb.ESMProtein(sequence=_sequence_text(protein)))
        return rs.parse_encode(await self._unary(self._stub.Encode, request, timeout))

    async def decode(self, tokens, *, timeout: float | None = None) -> ESMProtein:
        request = pb.DecodeRequest(tokens=rq.token_message(tokens))
        return rs.parse_decode(await self._unary(self._stub.Decode, request, timeout))

    async def logits(
        self,
        protein: ProteinLike,
        config: Any = None,
        *,
        output_dtype: str = "float32",
        timeout: float | None = None,
    ) -> LogitsOutput:
        request = rq.logits_request(protein, config, output_dtype)
        return rs.parse_logits(await self._unary(self._stub.Logits, request, timeout))

    async def forward_and_sample(
        self,
        protein: ProteinLike,
        sampling_config: Any = None,
        *,
        seed: int | None = None,
        output_dtype: str = "float32",
        timeout: float | None = None,
    ) -> ForwardAndSampleOutput:
        request = rq.forward_and_sample_request(protein, sampling_config, seed, output_dtype)
        return rs.parse_forward_and_sample(
            await self._unary(self._stub.ForwardAndSample, request, timeout)
        )

    # --- generation -----------------------------------------------------------------------

    async def generate_stream(
        self,
        protein: ProteinLike,
        config: Any = None,
        seed: int | None = None,
        *,
        timeout: float | None = None,
    ) -> AsyncIterator[GenerateStep]:
        """See :meth:`ESMCClient.generate_stream`."""
        request = rq.generate_request(protein, config, replay_seed(seed))
        retries = self._retries(timeout)
        replay = GenerationReplay()
        while True:
            call = self._stub.Generate(request, **self._kwargs(retries.remaining()))
            try:
                async for message in call:
                    step = rs.parse_generate(message)
                    if replay.accept(step):
                        yield step
                return
            except grpc.aio.AioRpcError as rpc:
                error = rs.rpc_error(rpc, retries.attempts)
                if (definitive := await self._transport_error_async(error)) is not None:
                    raise definitive from rpc
                delay = retries.next_delay(error.code, error.message, error.pushback_ms)
                if delay is None:
                    raise error from rpc
                replay.resuming(error, retries.attempts)
            finally:
                call.cancel()
            await asyncio.sleep(delay)

    async def generate(
        self,
        protein: ProteinLike,
        config: Any = None,
        seed: int | None = None,
        *,
        timeout: float | None = None,
    ) -> ESMProtein:
        final = None
        async for step in self.generate_stream(protein, config, seed, timeout=timeout):
            final = step if step.final else final
        return _check_final(final)

    async def batch_generate(
        self,
        proteins: Sequence[ProteinLike],
        config: Any = None,
        seeds: Sequence[int | None] | None = None,
        *,
        concurrency: int = 16,
        timeout: float | None = None,
        return_exceptions: bool = False,
    ) -> list[ESMProtein | ESMCError]:
        gate = asyncio.Semaphore(max(1, concurrency))

        async def run(job):
            async with gate:
                try:
                    return await self.generate(*job, timeout=timeout)
                except ESMCError as error:
                    if return_exceptions:
                        return error
                    raise

        jobs = _generation_jobs(proteins, config, seeds)
        return list(await asyncio.gather(*(run(job) for job in jobs)))

    # --- bulk embedding -------------------------------------------------------------------

    async def embed(
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
        timeout: float | None = None,
    ) -> list[EmbedResult]:
        """See :meth:`ESMCClient.embed`."""
        items, chunks = self._embed_chunks(
            sequences, batch_size, max_in_flight, layer=layer, pool=pool, output_dtype=output_dtype
        )
        results: list[EmbedResult | None] = [None] * len(items)
        gate = asyncio.Semaphore(max(1, concurrency))
        with progress_bar(progress, len(items), "embed") as bar:

            def record(done: list[tuple[int, EmbedResult]]) -> None:
                for index, result in done:
                    results[index] = result
                bar.update(len(done))

            async def run(chunk: EmbedChunk) -> None:
                async with gate:
                    await self._run_chunk(chunk, record, timeout)

            await asyncio.gather(*(run(chunk) for chunk in chunks))
        return results  # type: ignore[return-value]

    async def _run_chunk(self, chunk: EmbedChunk, record, timeout) -> None:
        while requests := chunk.to_send():
            error = None
            try:
                async for message in self._embed_stream(requests, chunk.window, timeout):
                    if (done := chunk.on_response(message)) is not None:
                        record([done])
            except grpc.aio.AioRpcError as rpc:
                error = rs.rpc_error(rpc)
                if (definitive := await self._transport_error_async(error)) is not None:
                    raise definitive from rpc
            record(chunk.on_stream_end(error))
            if (wait := chunk.next_wait()) is None:
                return
            delay, until_ready = wait
            await asyncio.sleep(delay)
            if until_ready:
                await self._wait_ready(chunk.ride_out_left())

    async def _wait_ready(self, timeout: float) -> None:
        """Wait (at most ``timeout`` s) for the channel to connect to a server."""
        try:
            await asyncio.wait_for(self._channel.channel_ready(), max(timeout, 0.01))
        except asyncio.TimeoutError:
            pass

    async def _embed_stream(
        self, requests, max_in_flight: int, timeout
    ) -> AsyncIterator[pb.EmbedResponse]:
        window = asyncio.Semaphore(max(1, max_in_flight))

        async def send():
            for request in requests:
                await window.acquire()
                yield request

        call = self._stub.Embed(send(), **self._kwargs(timeout))
        try:
            async for message in call:
                window.release()
                yield message
        finally:
            call.cancel()


# --- helpers ------------------------------------------------------------------------------


def _sequence_text(protein: ProteinLike) -> str:
    sequence = getattr(protein, "sequence", protein)
    if not isinstance(sequence, str):
        raise ValueError("encode takes a protein sequence string")
    return sequence


def _final_protein(steps: Iterator[GenerateStep]) -> ESMProtein:
    final = None
    for step in steps:
        final = step if step.final else final
    return _check_final(final)


def _check_final(final: GenerateStep | None) -> ESMProtein:
    if final is None or final.protein is None:
        raise ESMCError("DATA_LOSS", "the Generate stream ended without a final message")
    return final.protein


def _generation_jobs(proteins, config, seeds) -> list[tuple[ProteinLike, Any, int | None]]:
    """``(protein, config, seed)`` per prompt; ``config`` one for all or one per prompt."""
    proteins = list(proteins)
    configs = list(config) if isinstance(config, (list, tuple)) else [config] * len(proteins)
    seeds = list(seeds) if seeds is not None else [None] * len(proteins)
    if not len(configs) == len(seeds) == len(proteins):
        raise ValueError(
            f"{len(proteins)} proteins need as many configs and seeds "
            f"(got {len(configs)} configs, {len(seeds)} seeds)"
        )
    return list(zip(proteins, configs, seeds))
