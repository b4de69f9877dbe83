"""Attacks on the shared service, end to end: one caller cannot take the device from another.

Real servers on port 0 with a tiny random model over real channels; callers are told apart by
their ``esmc-caller`` label (authentication off). Each test asserts outcomes and counts (the
victim's calls all answer OK while the attacker's work is still running; a refusal names the
cost and the limit; the server keeps serving), never timings.
"""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from helpers.inprocess import running_server, server_config
from helpers.models import random_sequences, seeded_model
from helpers.wire import protein_request

from esmc_proto.v1 import esmc_pb2 as pb
from esmc_server.engine import Engine
from esmc_server.execute import BatchExecutor

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio, pytest.mark.timeout(600)]

ATTACKER = (("esmc-caller", "attacker"),)
VICTIM = (("esmc-caller", "victim"),)
SMALL = protein_request("MKTAYIAKQRQISFVKSHFSRQ", sequence=True)


@pytest.fixture(scope="module")
def model():
    return seeded_model(d_model=64, n_heads=2, n_layers=2, seed=0)


def masked_generate(length: int, steps: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        protein=pb.ESMProtein(sequence="_" * length),
        config=pb.GenerationConfig(num_steps=steps, temperature=1.0),
        seed=1,
    )


async def read_steps(call, counter: list[int]) -> None:
    """Read a Generate stream normally, counting its step messages."""
    try:
        async for response in call:
            if not response.final:
                counter[0] += 1
    except asyncio.CancelledError:  # cancelled here, by the test
        pass
    except grpc.aio.AioRpcError as error:
        if error.code() != grpc.StatusCode.CANCELLED:
            raise


async def victim_calls(stub, count: int) -> list[grpc.StatusCode]:
    codes = []
    for _ in range(count):
        try:
            response = await stub.Logits(SMALL, metadata=VICTIM, timeout=300)
            assert response.logits.sequence.shape == [24, 64]
            codes.append(grpc.StatusCode.OK)
        except grpc.aio.AioRpcError as error:
            codes.append(error.code())
    return codes


async def test_one_generation_filling_the_budget_does_not_starve_another_caller(model):
    """Each step of the attacker's generation fills the whole token budget: served first (the
    old rule), the victim's small Logits would never fit before the generation ended."""
    config = server_config(max_batch_tokens=512, max_wait_ms=1.0)
    async with running_server(model, config) as srv:
        steps = [0]
        call = srv.stub.Generate(masked_generate(510, 510), metadata=ATTACKER, timeout=600)
        reader = asyncio.create_task(read_steps(call, steps))
        while steps[0] < 3:  # the generation is under way
            await asyncio.sleep(0.05)
        codes = await victim_calls(srv.stub, 5)
        done_when_victim_finished = steps[0]
        call.cancel()
        await reader
        assert codes == [grpc.StatusCode.OK] * 5
        assert done_when_victim_finished < 510  # the victim did not wait for the generation
        await srv.assert_serving()


async def test_forty_long_generations_do_not_starve_another_callers_logits(model):
    config = server_config(max_batch_tokens=2048, max_wait_ms=1.0)
    async with running_server(model, config) as srv:
        counters = [[0] for _ in range(40)]
        calls = [
            srv.stub.Generate(masked_generate(200, 200), metadata=ATTACKER, timeout=600)
            for _ in range(40)
        ]
        readers = [asyncio.create_task(read_steps(c, n)) for c, n in zip(calls, counters)]
        while sum(n[0] for n in counters) < 40:
            await asyncio.sleep(0.05)
        codes = await victim_calls(srv.stub, 3)
        stepped = sum(n[0] for n in counters)
        for call in calls:
            call.cancel()
        await asyncio.gather(*readers)
        assert codes == [grpc.StatusCode.OK] * 3
        assert stepped < 40 * 200  # the generations were still running
        samples = srv.scrape()
        assert samples[("esmc_caller_requests_total", (("caller", "victim"), ("code", "OK")))] == 3
        assert samples[("esmc_caller_token_forwards_total", (("caller", "victim"),))] == 3 * 24
        assert samples[("esmc_caller_token_forwards_total", (("caller", "attacker"),))] == (
            40 * 200 * 202
        )


async def test_a_16k_residue_pll_is_refused_naming_its_cost_and_the_limit(model):
    config = server_config(max_wait_ms=1.0)
    async with running_server(model, config) as srv:
        forwards = srv.engine.stats.forwards
        [sequence] = random_sequences([16384])
        request = pb.PseudoLogLikelihoodRequest(protein=pb.ESMProtein(sequence=sequence))
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await srv.stub.PseudoLogLikelihood(request, metadata=ATTACKER, timeout=120)
        error = refused.value
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        details = error.details()
        assert "16,384 forwards of 16,386 tokens (268,468,224 token-forwards)" in details
        assert "the limit is 4,194,304 token-forwards per request" in details
        assert "--max-request-token-forwards" in details
        assert srv.engine.stats.forwards == forwards  # refused before anything ran
        assert srv.engine.admission.in_flight == 0
        # a generation of as many steps is refused alike
        with pytest.raises(grpc.aio.AioRpcError) as generation:
            async for _ in srv.stub.Generate(masked_generate(16384, 16384), timeout=120):
                pass
        assert generation.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "token-forwards" in generation.value.details()
        await srv.assert_serving()


class SlowExecutor(BatchExecutor):
    """Forwards that take 0.1 ms per token (a slow device, deterministic enough)."""

    def forward(self, model, batch, keep, return_logits=True):
        time.sleep(sum(batch.lengths) / 10_000)
        return super().forward(model, batch, keep, return_logits)


async def test_a_long_valid_logits_never_kills_the_server_with_a_short_forward_timeout(model):
    """16,386 tokens take ~1.6 s on this device; the forward timeout is 1 s. The start check
    caps what is admitted, so the long request is refused and the server stays up."""
    config = server_config(max_wait_ms=1.0)
    config = config.__class__(**{**config.__dict__, "warmup": True, "forward_timeout_s": 1.0})
    engine = Engine(model, config.batching, forward_timeout_s=1.0, executor=SlowExecutor())
    async with running_server(model, config, engine=engine) as srv:
        cap = engine.admission.max_forward_tokens
        assert cap is not None and cap < 16386
        [long] = random_sequences([12000])
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await srv.stub.Logits(protein_request(long, sequence=True), timeout=120)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "forward_timeout_s=1" in refused.value.details()
        assert engine.fatal is None
        assert await victim_calls(srv.stub, 2) == [grpc.StatusCode.OK] * 2
        await srv.assert_serving()
        # what is admitted still fits: one at the cap runs and the server stays up
        [fits] = random_sequences([cap - 2])
        response = await srv.stub.Logits(protein_request(fits, sequence=True), timeout=120)
        assert response.logits.sequence.shape == [cap, 64]
        assert engine.fatal is None


