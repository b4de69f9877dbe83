"""True signals: what the operator sees (status counts, log levels, log content) says what
happened. A caller that cancels is CANCELLED at INFO at most; sequences stay out of the logs.

Real in-process servers on port 0; the tests count statuses and log records, never timings.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import logging

import aiohttp
import grpc
import pytest
from helpers.inprocess import running_server, server_config
from helpers.models import seeded_model

from esmc_proto.v1 import esmc_pb2 as pb
from esmc_server import logs

pytestmark = pytest.mark.e2e

STREAMS = 50


@pytest.fixture(scope="module")
def model():
    return seeded_model(d_model=64, n_heads=1, n_layers=2, seed=3)


def requests_by_code(samples, method: str) -> dict[str, float]:
    counts: dict[str, float] = {}
    for (name, labels), value in samples.items():
        labels = dict(labels)
        if name == "esmc_requests_total" and labels.get("method") == method and value:
            counts[labels["code"]] = counts.get(labels["code"], 0) + value
    return counts


async def _wait_counted(running, method: str, total: int) -> dict[str, float]:
    for _ in range(600):
        counts = requests_by_code(running.scrape(), method)
        if sum(counts.values()) >= total:
            return counts
        await asyncio.sleep(0.05)
    raise AssertionError(f"{method}: {counts}")


async def test_generate_streams_cancelled_mid_write_count_cancelled_without_errors(model, caplog):
    """Fifty Generate streams, each cancelled by its caller after a few messages (mid-write:
    the server is writing steps as fast as they come): all counted CANCELLED, nothing logged
    above INFO."""
    caplog.set_level(logging.DEBUG)
    config = server_config(max_wait_ms=1, generation_window=4)
    async with running_server(model, config) as running:
        request = pb.GenerateRequest(
            protein=pb.ESMProtein(sequence="M" + "_" * 300),
            config=pb.GenerationConfig(num_steps=300),
        )

        async def cancel_after(reads: int) -> None:
            call = running.stub.Generate(request, timeout=120)
            for _ in range(reads):
                await call.read()
            call.cancel()

        await asyncio.gather(*(cancel_after(1 + i % 5) for i in range(STREAMS)))
        counts = await _wait_counted(running, "Generate", STREAMS)
        assert counts == {"CANCELLED": STREAMS}, counts
        await running.assert_serving()
    loud = [r for r in caplog.records if r.levelno > logging.INFO]
    assert loud == [], [r.getMessage() for r in loud][:5]


async def test_a_token_removed_by_a_reload_ends_its_open_streams(model, tmp_path):
    """Two callers stream; the tokens file loses one of them and is reloaded (what SIGHUP
    does): that caller's open Generate and Embed streams end UNAUTHENTICATED, the other's
    stream goes on, and the removed token is refused for new calls."""
    tokens = tmp_path / "tokens"
    tokens.write_text("alice:tok-alice-1\nbob:tok-bob-2\n")
    config = dataclasses.replace(
        server_config(max_wait_ms=1), auth_tokens_file=str(tokens)
    )
    async with running_server(model, config) as running:
        alice = [("authorization", "Bearer tok-alice-1")]
        bob = [("authorization", "Bearer tok-bob-2")]
        request = pb.GenerateRequest(
            protein=pb.ESMProtein(sequence="M" + "_" * 200),
            config=pb.GenerationConfig(num_steps=200),
        )
        alice_generate = running.stub.Generate(request, timeout=120, metadata=alice)
        bob_generate = running.stub.Generate(request, timeout=120, metadata=bob)
        embed_requests: asyncio.Queue = asyncio.Queue()

        async def embeds():
            while (item := await embed_requests.get()) is not None:
                yield item

        alice_embed = running.stub.Embed(embeds(), timeout=120, metadata=alice)
        await embed_requests.put(pb.EmbedRequest(id="a", protein=pb.ESMProtein(sequence="MKT")))
        assert (await alice_embed.read()).id == "a"
        await alice_generate.read()
        await bob_generate.read()
        assert len(running.server.security.streams) == 3

        tokens.write_text("bob:tok-bob-2\n")
        running.server.security.reload()

        for call in (alice_generate, alice_embed):
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                while True:
                    if await call.read() is grpc.aio.EOF:
                        break
            assert ended.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "removed" in ended.value.details()
        assert (await bob_generate.read()).step >= 1  # the other caller goes on
        bob_generate.cancel()
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await running.stub.Info(pb.InfoRequest(), timeout=10, metadata=alice)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        await embed_requests.put(None)


SECRET = "MKWVTFISLLFLFSSAYSRGVFRRDTHKSEIAHRFKDLGE"


@pytest.mark.unit
def test_unexpected_exceptions_are_logged_without_their_message():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(logs.WithholdContent())
    logger = logging.getLogger("esmc_server.test_withheld")
    logger.addHandler(handler)
    try:
        try:
            raise KeyError(f"no row for {SECRET}")
        except KeyError:
            logger.exception("Logits failed (reference abc)")
    finally:
        logger.removeHandler(handler)
    text = stream.getvalue()
    assert "Logits failed (reference abc)" in text and "builtins.KeyError" in text
    assert "test_signals.py" in text and logs.WITHHELD in text
    assert SECRET not in text


async def test_refused_requests_log_no_sequence_at_info(model, caplog):
    """Bad requests of every kind quote the sequence back to the caller, never in the log
    (at the default level)."""
    caplog.set_level(logging.INFO)
    async with running_server(model, server_config(max_wait_ms=1)) as running:
        stub = running.stub
        bad = [
            stub.Logits(pb.LogitsRequest(protein=pb.ESMProtein(sequence=SECRET + "9")), timeout=30),
            stub.ScoreVariants(pb.ScoreVariantsRequest(
                wild_type=pb.ESMProtein(sequence=SECRET), variants=[f"Q1A:{SECRET}"]), timeout=30),
            stub.Encode(pb.EncodeRequest(protein=pb.ESMProtein(sequence=SECRET * 1000)), timeout=30),
        ]
        for call in bad:
            with pytest.raises(grpc.aio.AioRpcError):
                await call
        replies = [r async for r in stub.Embed(_two(SECRET), timeout=30)]
        assert any(r.HasField("error") for r in replies)
    text = "\n".join(record.getMessage() for record in caplog.records)
    assert SECRET not in text


async def _two(sequence: str):
    for _ in range(2):
        yield pb.EmbedRequest(id=sequence, protein=pb.ESMProtein(sequence=sequence + "1"))


async def test_requests_are_counted_per_caller_by_token_name(model, tmp_path):
    """An operator sees who uses the service: requests by caller (the token's name, never
    the token or an address) and status code, over gRPC and HTTP alike."""
    tokens = tmp_path / "tokens"
    tokens.write_text("alice:tok-alice-1\nbob:tok-bob-2\n")
    config = dataclasses.replace(
        server_config(max_wait_ms=1), auth_tokens_file=str(tokens), http_port=0,
        model="esmc-tiny",
    )
    async with running_server(model, config) as running:
        for _ in range(3):
            await running.stub.Info(pb.InfoRequest(), timeout=10,
                                    metadata=[("authorization", "Bearer tok-alice-1")])
        with pytest.raises(grpc.aio.AioRpcError):
            await running.stub.Encode(pb.EncodeRequest(protein=pb.ESMProtein(sequence="9")),
                                      timeout=10, metadata=[("authorization", "Bearer tok-bob-2")])
        url = f"http://127.0.0.1:{running.server.http.port}/api/v1/encode"
        async with aiohttp.ClientSession() as session:
            async with session.post(url, json={"inputs": {"sequence": "MKT"}},
                                    headers={"Authorization": "Bearer tok-bob-2"}) as reply:
                assert reply.status == 200
        samples = running.scrape()
    by_caller = {
        (dict(labels)["caller"], dict(labels)["code"]): value
        for (name, labels), value in samples.items()
        if name == "esmc_caller_requests_total"
    }
    assert by_caller == {("alice", "OK"): 3, ("bob", "INVALID_ARGUMENT"): 1, ("bob", "OK"): 1}
    assert not any("tok-" in str(labels) for (_, labels) in samples)
