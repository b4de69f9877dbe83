"""``AsyncESMCClient``: the asyncio client (``grpc.aio``), with the same arguments and
methods as the blocking :class:`~esmc_client.client.ESMCClient` (see there)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from typing import Any

import grpc.aio

from esmc_client import requests as rq
from esmc_client import responses as rs
from esmc_client.bulk import EmbedChunk, progress_bar
from esmc_client.client_base import ClientBase, check_final, generation_jobs, sequence_text
from esmc_client.replay import GenerationReplay, replay_seed
from esmc_client.requests import ProteinLike
from esmc_client.scoring import AsyncScoringCalls
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


class AsyncESMCClient(AsyncScoringCalls, ClientBase):
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

    async def _unary(self, method, request, timeout: float | None, model: str | None = None):
        asked = self._ask(request, model)
        retries = self._retries(timeout)
        while True:
            try:
                response = await method(request, **self._kwargs(retries.remaining()))
                rs.check_answer(asked, response)
                return response
            except grpc.aio.AioRpcError as rpc:
                error = rs.rpc_error(rpc, retries.attempts)
                if (definitive := await self._transport_error_async(error)) is not None:
                    raise definitive from rpc
                delay = retries.next_delay(error.code, error.message, error.pushback_ms)
                if delay is None:
                    raise error from rpc
            await asyncio.sleep(delay)

    # --- unary calls ----------------------------------------------------------------------

    async def info(self, *, model: str | None = None, timeout: float | None = None) -> ServerInfo:
        return rs.parse_info(await self._unary(self._stub.Info, pb.InfoRequest(), timeout, model))

    async def encode(self, protein: ProteinLike, *, timeout: float | None = None):
        request = pb.EncodeRequest(protein=pb.ESMProtein(sequence=sequence_text(protein)))
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
        model: str | None = None,
        timeout: float | None = None,
    ) -> LogitsOutput:
        request = rq.logits_request(protein, config, output_dtype)
        return rs.parse_logits(await self._unary(self._stub.Logits, request, timeout, model))

    async def forward_and_sample(
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
            await self._unary(self._stub.ForwardAndSample, request, timeout, model)
        )

    # --- generation -----------------------------------------------------------------------

    async def generate_stream(
        self,
        protein: ProteinLike,
        config: Any = None,
        seed: int | None = None,
        *,
        model: str | None = None,
        timeout: float | None = None,
    ) -> AsyncIterator[GenerateStep]:
        """See :meth:`ESMCClient.generate_stream`."""
        request = rq.generate_request(protein, config, replay_seed(seed))
        asked = self._ask(request, model)
        retries = self._retries(timeout)
        replay = GenerationReplay()
        while True:
            call = self._stub.Generate(request, **self._kwargs(retries.remaining()))
            try:
                async for message in call:
                    rs.check_model(asked, message.metadata.model)
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
        model: str | None = None,
        timeout: float | None = None,
    ) -> ESMProtein:
        final = None
        async for step in self.generate_stream(protein, config, seed, model=model, timeout=timeout):
            final = step if step.final else final
        return check_final(final)

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

        jobs = generation_jobs(proteins, config, seeds)
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
        model: str | None = None,
        timeout: float | None = None,
    ) -> list[EmbedResult]:
        """See :meth:`ESMCClient.embed`."""
        items, chunks = self._embed_chunks(
            sequences, batch_size, max_in_flight, layer=layer, pool=pool, output_dtype=output_dtype,
            model=self.model if model is None else model,
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
                stream = self._embed_stream(requests, chunk.window, timeout)
                async with contextlib.aclosing(stream):
                    async for message in stream:
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

    def _embed_stream(
        self, requests, max_in_flight: int, timeout
    ) -> AsyncIterator[pb.EmbedResponse]:
        """One Embed stream, at most ``max_in_flight`` requests ahead of their responses."""
        return self._bidi_stream(self._stub.Embed, requests, max_in_flight, timeout)

    async def _bidi_stream(self, method, requests, window: int | None, timeout) -> AsyncIterator:
        """Responses of one bidirectional stream of ``requests``, at most ``window`` of them
        (None: all) ahead of their responses.

        This generator writes the requests from a task of its own, which it cancels and
        awaits when the stream ends in any way: handing grpc.aio an async generator instead
        leaves grpc.aio's consumer task waiting on the window of a stream the server already
        ended, destroyed pending with its generator when collected.
        """
        call = method(**self._kwargs(timeout))
        free = asyncio.Semaphore(max(1, window or len(requests)))

        async def write() -> None:
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                for request in requests:
                    await free.acquire()
                    await call.write(request)
                await call.done_writing()
            # else the call ended: its status comes from reading it

        writer = asyncio.create_task(write())
        try:
            async for message in call:
                free.release()
                yield message
        finally:
            call.cancel()
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)
