"""OpenTelemetry tracing with the SDK's in-memory exporter, against a real server.

The server runs on its own event-loop thread with a TracerProvider exporting to memory; the
blocking client calls it inside a caller's span, so the server's spans must join that trace.
"""

from __future__ import annotations

import time

import pytest
import torch

pytest.importorskip("opentelemetry.sdk")

from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (  # noqa: E402
    InMemorySpanExporter,
)
from opentelemetry.trace import SpanKind, StatusCode  # noqa: E402

from esmc.config import ESMCConfig  # noqa: E402
from esmc import ESMC  # noqa: E402
from esmc_client import ESMCClient, ESMCError, GenerationConfig, LogitsConfig  # noqa: E402
from esmc_server import tracing  # noqa: E402
from esmc_server.config import ServerConfig  # noqa: E402
from helpers.inprocess import loop_thread, serving_on

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def loop():
    with loop_thread() as loop:
        yield loop


@pytest.fixture(scope="module")
def model() -> ESMC:
    torch.manual_seed(0)
    return ESMC(ESMCConfig(d_model=64, n_heads=1, n_layers=2)).eval()


@pytest.fixture(scope="module")
def traced(loop, model):
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with serving_on(loop, model, metrics=False, tracer_provider=provider) as server:
        yield f"127.0.0.1:{server.port}", exporter, provider


def finished(exporter, *names: str) -> list:
    """The exported spans once one of each of ``names`` is there (a server span ends just
    after its last message leaves, which the client may see first)."""
    deadline = time.monotonic() + 10
    while True:
        spans = exporter.get_finished_spans()
        if all(any(s.name == n for s in spans) for n in names) or time.monotonic() > deadline:
            return spans
        time.sleep(0.01)


def children(spans, parent) -> list:
    return [s for s in spans if s.parent is not None and s.parent.span_id == parent.context.span_id]


def test_logits_span_joins_the_callers_trace_with_queue_forward_and_build(traced):
    target, exporter, provider = traced
    exporter.clear()
    caller_tracer = provider.get_tracer("caller")
    with ESMCClient(target) as client:
        with caller_tracer.start_as_current_span("caller") as caller:
            client.logits("MKTAYIAKQR", LogitsConfig(sequence=True), timeout=30)
        client.info(timeout=30)  # no current span: a trace of its own
    spans = finished(exporter, "esmc.v1.ESMC/Logits", "esmc.v1.ESMC/Info")
    (rpc,) = [s for s in spans if s.name == "esmc.v1.ESMC/Logits"]
    assert rpc.kind == SpanKind.SERVER
    assert rpc.context.trace_id == caller.get_span_context().trace_id
    assert rpc.parent.span_id == caller.get_span_context().span_id
    assert rpc.attributes["rpc.method"] == "Logits" and rpc.attributes["rpc.grpc.status_code"] == 0
    parts = {s.name: s for s in children(spans, rpc)}
    assert set(parts) == {"queue", "forward", "build response"}
    queue, forward, build = parts["queue"], parts["forward"], parts["build response"]
    assert forward.attributes["esmc.batch_size"] == 1
    assert forward.attributes["esmc.batch_tokens"] == 12  # 10 residues + BOS + EOS
    # in order, inside the RPC's span
    assert rpc.start_time <= queue.start_time <= queue.end_time == forward.start_time
    assert forward.end_time == build.start_time <= build.end_time <= rpc.end_time
    (info,) = [s for s in spans if s.name == "esmc.v1.ESMC/Info"]
    assert info.parent is None and info.context.trace_id != rpc.context.trace_id
    assert not children(spans, info)  # no engine work


def test_embed_and_generate_spans_per_sequence_and_per_step(traced):
    target, exporter, _ = traced
    exporter.clear()
    with ESMCClient(target) as client:
        results = client.embed({"a": "MKTAYIAKQR", "b": "MKV", "c": "MKVLA"}, timeout=30)
        steps = list(client.generate_stream("MK___V", GenerationConfig(num_steps=3), 5, timeout=30))
    assert all(r.ok for r in results) and steps[-1].final
    spans = finished(exporter, "esmc.v1.ESMC/Embed", "esmc.v1.ESMC/Generate")
    (embed,) = [s for s in spans if s.name == "esmc.v1.ESMC/Embed"]
    names = sorted(s.name for s in children(spans, embed))
    assert names == ["build response"] * 3 + ["forward"] * 3 + ["queue"] * 3
    tokens = sorted(s.attributes["esmc.batch_tokens"] for s in children(spans, embed)
                    if s.name == "forward")
    assert all(t >= 5 for t in tokens)  # each sequence's forward, alone or batched
    (generate,) = [s for s in spans if s.name == "esmc.v1.ESMC/Generate"]
    forwards = [s for s in children(spans, generate) if s.name == "forward"]
    assert len(forwards) == 3  # one per step


def test_failed_calls_mark_their_span(traced):
    target, exporter, _ = traced
    exporter.clear()
    with ESMCClient(target) as client, pytest.raises(ESMCError):
        client.logits("MKV", LogitsConfig(return_hidden_states=True, ith_hidden_layer=99), timeout=30)
    spans = finished(exporter, "esmc.v1.ESMC/Logits")
    (rpc,) = [s for s in spans if s.name == "esmc.v1.ESMC/Logits"]
    assert rpc.status.status_code == StatusCode.ERROR and "INVALID_ARGUMENT" in rpc.status.description
    assert rpc.attributes["rpc.grpc.status_code"] == 3


def test_nothing_changes_when_off(loop, model):
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with serving_on(loop, model, metrics=False) as server:  # no provider, no endpoint
        assert server.tracer_provider is None
        with ESMCClient(f"127.0.0.1:{server.port}") as client:
            with provider.get_tracer("caller").start_as_current_span("caller"):
                out = client.logits("MKTAYIAKQR", LogitsConfig(sequence=True), timeout=30)
    assert out.logits.sequence.shape == (12, 64)
    assert [s.name for s in exporter.get_finished_spans()] == ["caller"]


@pytest.mark.unit
def test_otlp_endpoint_setting():
    config = ServerConfig.from_env({"ESMC_OTLP_ENDPOINT": "http://collector:4317"})
    assert config.otlp_endpoint == "http://collector:4317"
    provider = tracing.otlp_tracer_provider(config.otlp_endpoint)
    provider.shutdown()
