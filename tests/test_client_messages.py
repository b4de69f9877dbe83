"""Request building and response parsing of esmc_client, with hand-built messages."""

import pickle
import time
from dataclasses import FrozenInstanceError

import numpy as np
import pytest

from esmc_client import (
    ESMCError,
    ESMProtein,
    ESMProteinTensor,
    GenerationConfig,
    LogitsConfig,
    RetryBudget,
    RetryPolicy,
    SamplingConfig,
    SamplingTrackConfig,
)
from esmc_client import requests as rq
from esmc_client import responses as rs
from esmc_proto.v1 import esmc_pb2 as pb
from esmc_client.bulk import make_chunks
from esmc_client.channel import channel_options
from esmc_client.retry import CallRetries, pushback_ms, retryable
from esmc_client.tensors import from_numpy

pytestmark = pytest.mark.unit


# --- inputs -------------------------------------------------------------------------------


@pytest.mark.parametrize("protein", ["MKT_L", ESMProtein("MKT_L")])
def test_sequence_inputs_use_the_protein_field(protein):
    request = rq.logits_request(protein)
    assert request.WhichOneof("input") == "protein"
    assert request.protein.sequence == "MKT_L"


@pytest.mark.parametrize(
    "tokens",
    [[0, 20, 15, 2], np.array([0, 20, 15, 2], dtype=np.int64), ESMProteinTensor(np.int32([0, 20, 15, 2]))],
)
def test_token_inputs_use_the_tokens_field(tokens):
    request = rq.logits_request(tokens)
    assert request.WhichOneof("input") == "tokens"
    assert list(request.tokens.sequence) == [0, 20, 15, 2]


def test_reference_style_objects_are_read_by_field_name():
    class ReferenceProtein:  # like esm.sdk.api.ESMProtein
        sequence = "MKV"
        secondary_structure = None

    class ReferenceConfig:  # like esm.sdk.api.LogitsConfig
        sequence = True
        structure = False
        return_embeddings = True
        return_hidden_states = True
        ith_hidden_layer = -2
        return_mean_embedding = False
        return_mean_hidden_states = True

    request = rq.logits_request(ReferenceProtein(), ReferenceConfig())
    assert request.protein.sequence == "MKV"
    config = request.config
    assert (config.sequence, config.return_embeddings, config.return_hidden_states) == (True,) * 3
    assert config.HasField("ith_hidden_layer") and config.ith_hidden_layer == -2
    assert config.return_mean_hidden_states and not config.return_mean_embedding


@pytest.mark.parametrize("bad", [[[0, 1], [2, 3]], np.float32([0, 1, 2]), None])
def test_bad_token_inputs_raise(bad):
    with pytest.raises(ValueError):
        rq.logits_request(bad)


def test_logits_config_defaults_and_all_layers():
    assert rq.logits_request("M").config == pb.LogitsConfig(sequence=True)  # None -> logits
    message = rq.logits_config_message(LogitsConfig(return_hidden_states=True))
    assert not message.HasField("ith_hidden_layer")  # -1: all blocks
    assert rq.logits_config_message(LogitsConfig(ith_hidden_layer=0)).ith_hidden_layer == 0


def test_declared_tracks_are_forwarded_for_the_server_to_refuse():
    class AsksForStructure:
        structure = True

    assert rq.logits_config_message(AsksForStructure()).structure


def test_output_dtype():
    assert rq.logits_request("M", output_dtype="bfloat16").output_dtype == pb.DTYPE_BFLOAT16
    with pytest.raises(ValueError, match="output_dtype must be one of"):
        rq.logits_request("M", output_dtype="int64")


def test_embed_request_layer_and_pooling():
    request = rq.embed_request("7", "MKV", layer=-2, pool="mean", output_dtype="float16")
    assert (request.id, request.layer, request.pooling) == ("7", -2, pb.POOLING_MEAN)
    assert request.output_dtype == pb.DTYPE_FLOAT16
    assert request.HasField("layer")
    unset = rq.embed_request("x", [0, 4, 2], layer=None, pool="none")
    assert not unset.HasField("layer") and unset.pooling == pb.POOLING_NONE
    with pytest.raises(ValueError, match="pool must be"):
        rq.embed_request("x", "M", pool="max")


def test_embed_items_keep_ids_or_number_positions():
    assert rq.embed_items(["MK", "LV"]) == [("0", "MK"), ("1", "LV")]
    assert rq.embed_items([("a", "MK"), ("b", "LV")]) == [("a", "MK"), ("b", "LV")]
    assert rq.embed_items({"a": "MK"}) == [("a", "MK")]


def test_generation_config_every_field_explicit():
    config = GenerationConfig(
        invalid_ids=(23, 24), schedule="linear", strategy="entropy", num_steps=8,
        temperature=0.0, temperature_annealing=False, top_p=0.9,
    )
    request = rq.generate_request("MKT___LL__", config, seed=7)
    message = request.config
    assert request.seed == 7 and request.protein.sequence == "MKT___LL__"
    assert (message.track, message.schedule, message.strategy) == ("sequence", "linear", "entropy")
    assert list(message.invalid_ids) == [23, 24]
    assert message.num_steps == 8 and message.temperature == 0.0
    assert message.HasField("temperature") and message.HasField("temperature_annealing")
    assert not message.temperature_annealing
    assert message.top_p == pytest.approx(0.9)
    assert not rq.generate_request("M_").HasField("seed")


def test_sampling_config():
    track = SamplingTrackConfig(temperature=0.5, top_p=0.8, invalid_ids=(5,), topk_logprobs=3)
    request = rq.forward_and_sample_request(
        "MK_", SamplingConfig(sequence=track, return_mean_embedding=True), seed=3
    )
    sequence = request.sampling_config.sequence
    assert (sequence.temperature, list(sequence.invalid_ids), sequence.topk_logprobs) == (0.5, [5], 3)
    assert sequence.top_p == pytest.approx(0.8) and sequence.only_sample_masked_tokens
    assert request.sampling_config.return_mean_embedding and request.seed == 3
    assert not request.sampling_config.HasField("structure")
    default = rq.forward_and_sample_request("MK_").sampling_config
    assert default.HasField("sequence") and not default.sequence.HasField("temperature")


def test_configs_are_frozen_without_mutable_defaults():
    config = GenerationConfig()
    with pytest.raises(FrozenInstanceError):
        config.num_steps = 3  # type: ignore[misc]
    assert config.invalid_ids == ()


# --- channel ------------------------------------------------------------------------------


def test_channel_options_from_one_size_setting():
    options = dict(channel_options(1234, (("grpc.max_reconnect_backoff_ms", 500),)))
    assert options["grpc.max_send_message_length"] == 1234
    assert options["grpc.max_receive_message_length"] == 1234
    assert options["grpc.lb_policy_name"] == "round_robin"
    assert options["grpc.max_reconnect_backoff_ms"] == 500  # extra options win
    assert "grpc.service_config" not in options  # no gRPC retry policy: the client retries


def test_backoff_grows_exponentially_within_jitter():
    policy = RetryPolicy(initial_backoff_s=0.1, multiplier=2.0, max_backoff_s=0.5)
    for retry, base in [(1, 0.1), (2, 0.2), (3, 0.4), (4, 0.5), (9, 0.5)]:
        delay = policy.delay(retry)
        assert base * 0.5 <= delay <= base


# --- responses ----------------------------------------------------------------------------


def _metadata():
    return pb.ResponseMetadata(queue_ms=1.5, compute_ms=2.5, batch_size=3, batch_tokens=40, forwards=1)


def test_parse_logits():
    logits = np.arange(5 * 64, dtype=np.float32).reshape(5, 64)
    hidden = np.ones((2, 5, 8), dtype=np.float32)
    message = pb.LogitsResponse(
        logits=pb.ForwardTrackData(sequence=from_numpy(logits)),
        hidden_states=from_numpy(hidden, "bfloat16"),
        mean_embedding=from_numpy(np.float16([0.5] * 8)),
        hidden_layers=[0, 1],
        metadata=_metadata(),
    )
    out = rs.parse_logits(pb.LogitsResponse.FromString(message.SerializeToString()))
    np.testing.assert_array_equal(out.logits.sequence, logits)
    assert out.hidden_states.dtype == np.float32 and out.hidden_states.shape == (2, 5, 8)
    np.testing.assert_array_equal(out.hidden_states, hidden)
    assert out.mean_embedding.dtype == np.float16 and out.mean_embedding[0] == 0.5
    assert out.embeddings is None and out.mean_hidden_states is None
    assert out.hidden_layers == (0, 1)
    assert (out.metadata.queue_ms, out.metadata.compute_ms) == (1.5, 2.5)
    assert (out.metadata.batch_size, out.metadata.batch_tokens, out.metadata.forwards) == (3, 40, 1)


def test_parse_info():
    message = pb.InfoResponse(
        model_name="esmc-tiny", d_model=64, n_heads=1, n_layers=2, vocabulary=["<cls>", "<pad>"],
        max_length=2048, dtype="float32", device="cpu",
        batching=pb.BatchingLimits(max_batch_tokens=4096, max_batch_size=64, max_wait_ms=5.0,
                                   max_queue=1000, packed=True),
        max_message_bytes=512 << 20, server_version="0.1.0", logits_width=64,
    )
    info = rs.parse_info(message)
    assert info.vocabulary == ("<cls>", "<pad>") and info.max_length == 2048
    assert info.batching.max_batch_tokens == 4096 and info.batching.packed
    assert info.max_message_bytes == 512 << 20


def test_parse_generate_steps_and_final():
    step = rs.parse_generate(
        pb.GenerateResponse(step=1, num_steps=4, positions=[3, 5], tokens=[4, 5],
                            probabilities=[0.5, 0.25], entropies=[1.0, 2.0], temperature=0.75,
                            sequence="MKTL_A", metadata=_metadata())
    )
    assert (step.step, step.num_steps, step.positions, step.tokens) == (2, 4, (3, 5), (4, 5))  # 1-based
    assert step.probabilities == (0.5, 0.25) and step.sequence == "MKTL_A"
    assert not step.final and step.protein is None and step.protein_tensor is None
    final = rs.parse_generate(
        pb.GenerateResponse(step=4, num_steps=4, sequence="MKTLAA", final=True,
                            protein=pb.ESMProtein(sequence="MKTLAA"),
                            protein_tensor=pb.ESMProteinTensor(sequence=[0, 20, 15, 11, 4, 5, 5, 2]))
    )
    assert final.final and final.protein == ESMProtein("MKTLAA") and final.step is None
    np.testing.assert_array_equal(final.protein_tensor, [0, 20, 15, 11, 4, 5, 5, 2])


def test_parse_forward_and_sample():
    message = pb.ForwardAndSampleResponse(
        protein_tensor=pb.ESMProteinTensor(sequence=[0, 4, 2]),
        protein=pb.ESMProtein(sequence="L"),
        entropy=from_numpy(np.float32([0, 1.5, 0])),
        topk_tokens=from_numpy(np.int64([[0, 1], [4, 5], [2, 3]])),
    )
    out = rs.parse_forward_and_sample(message)
    np.testing.assert_array_equal(out.protein_tensor, [0, 4, 2])
    assert out.protein.sequence == "L" and out.entropy[1] == 1.5
    assert out.topk_tokens.dtype == np.int64 and out.topk_tokens[1, 1] == 5
    assert out.prob is None and out.mean_embedding is None


# --- bulk bookkeeping ---------------------------------------------------------------------


def _ok(wire_id, value):
    return pb.EmbedResponse(id=wire_id, embedding=from_numpy(np.float32([value, value])))


def _err(wire_id, code):
    return pb.EmbedResponse(id=wire_id, error=pb.Error(code=code, message=f"{code} here"))


def test_chunks_number_requests_and_keep_caller_ids():
    items = [("a", "MK"), ("a", "LV"), ("c", [0, 4, 2])]  # duplicate ids are fine
    chunks = make_chunks(items, 2, RetryPolicy(), layer=1, pool="mean", output_dtype="float32")
    assert len(chunks) == 2
    first = chunks[0].to_send()
    assert [r.id for r in first] == ["0", "1"] and first[1].layer == 1
    assert chunks[1].to_send()[0].tokens.sequence == [0, 4, 2]
    done = chunks[0].on_response(_ok("1", 2.0))
    assert done[0] == 1 and done[1].id == "a" and done[1].embedding[0] == 2.0


def test_own_invalid_argument_is_final_and_retryable_errors_are_retried():
    policy = RetryPolicy(max_retries=2, initial_backoff_s=0.01)
    (chunk,) = make_chunks([("a", "MK"), ("b", "MJ"), ("c", "LV")], 8, policy, window=8)
    assert len(chunk.to_send()) == 3
    assert chunk.on_response(_ok("0", 1.0))[1].ok
    bad = chunk.on_response(_err("1", "INVALID_ARGUMENT"))
    assert bad[0] == 1 and bad[1].error.code == "INVALID_ARGUMENT" and bad[1].embedding is None
    assert chunk.on_response(_err("2", "RESOURCE_EXHAUSTED")) is None  # to be retried
    assert chunk.on_stream_end(None) == []
    assert chunk.next_wait() is not None and chunk.window == 4  # busy: window halved
    again = chunk.to_send()
    assert [r.id for r in again] == ["2"]
    index, result = chunk.on_response(_ok("2", 3.0))
    assert index == 2 and result.ok and result.attempts == 2 and result.id == "c"
    assert chunk.on_stream_end(None) == [] and chunk.next_wait() is None


def test_busy_retries_stop_after_max_retries():
    (chunk,) = make_chunks([("a", "MK")], 8, RetryPolicy(max_retries=2, initial_backoff_s=0.01))
    for _ in range(2):
        chunk.to_send()
        assert chunk.on_response(_err("0", "RESOURCE_EXHAUSTED")) is None
        chunk.on_stream_end(None)
    chunk.to_send()
    index, result = chunk.on_response(_err("0", "RESOURCE_EXHAUSTED"))
    assert result.error.code == "RESOURCE_EXHAUSTED" and result.attempts == 3
    assert chunk.to_send() == []


def test_busy_retries_are_paid_from_the_shared_budget():
    budget = RetryBudget(ratio=0.0, burst=1.0)  # one retry in all
    policy = RetryPolicy(max_retries=5, initial_backoff_s=0.01)
    (chunk,) = make_chunks([("a", "MK"), ("b", "LV")], 8, policy, budget)
    chunk.to_send()
    assert chunk.on_response(_err("0", "RESOURCE_EXHAUSTED")) is None  # paid
    index, result = chunk.on_response(_err("1", "RESOURCE_EXHAUSTED"))  # budget spent
    assert index == 1 and result.error.code == "RESOURCE_EXHAUSTED" and result.attempts == 1
    assert (budget.retries, budget.refused) == (1, 1)


def test_unavailable_is_ridden_out_for_ride_out_s_then_final():
    policy = RetryPolicy(ride_out_s=0.3, initial_backoff_s=0.01, max_backoff_s=0.02)
    (chunk,) = make_chunks([("a", "MK"), ("b", "LV")], 8, policy)
    chunk.to_send()
    assert chunk.on_stream_end(ESMCError("UNAVAILABLE", "connection refused")) == []
    delay, until_ready = chunk.next_wait()
    assert until_ready and delay <= 0.02
    chunk.to_send()
    assert chunk.on_response(_ok("0", 1.0))[1].ok  # progress restarts the clock
    time.sleep(0.35)
    assert chunk.on_response(_err("1", "UNAVAILABLE")) is None  # a new outage starts now
    chunk.on_stream_end(None)
    chunk.to_send()
    time.sleep(0.35)
    (index, result), = chunk.on_stream_end(ESMCError("UNAVAILABLE", "connection refused"))
    assert index == 1 and result.error.code == "UNAVAILABLE" and result.attempts == 3
    assert chunk.next_wait() is None


def test_a_stream_ended_with_pushback_is_resent_after_that_wait():
    (chunk,) = make_chunks([("a", "MK")], 8, RetryPolicy(initial_backoff_s=5.0))
    chunk.to_send()
    assert chunk.on_stream_end(ESMCError("UNAVAILABLE", "shutting down", pushback_ms=500)) == []
    delay, until_ready = chunk.next_wait()
    assert until_ready and 0.5 <= delay <= 0.6


def test_message_size_refusals_are_never_resent():
    (chunk,) = make_chunks([("a", "MK")], 8, RetryPolicy())
    chunk.to_send()
    error = ESMCError("RESOURCE_EXHAUSTED", "Sent message larger than max (5000 vs. 4194304)")
    (index, result), = chunk.on_stream_end(error)
    assert result.attempts == 1 and chunk.next_wait() is None


# --- retry decisions ----------------------------------------------------------------------


def test_definitive_errors_are_never_retried():
    for code in ("INVALID_ARGUMENT", "FAILED_PRECONDITION", "OUT_OF_RANGE", "DEADLINE_EXCEEDED",
                 "CANCELLED", "INTERNAL", "UNAUTHENTICATED", "PERMISSION_DENIED", "UNIMPLEMENTED"):
        retries = CallRetries(RetryPolicy(), RetryBudget(1.0, 100.0), None)
        assert retries.next_delay(code, "no", None) is None
    assert not retryable("RESOURCE_EXHAUSTED", "Received message larger than max (9 vs. 4)")
    assert retryable("RESOURCE_EXHAUSTED", "3 requests are waiting (max_queue=2)")
    assert retryable("UNAVAILABLE", "Connection refused")


def test_budget_allows_burst_plus_a_fraction_of_calls():
    budget = RetryBudget(ratio=0.2, burst=10.0)
    policy = RetryPolicy(initial_backoff_s=0.0)
    granted = 0
    for _ in range(500):  # every call fails with a retryable status, every retry too
        retries = CallRetries(policy, budget, None)
        while retries.next_delay("RESOURCE_EXHAUSTED", "queue full", None) is not None:
            granted += 1
    assert granted <= 10 + 0.2 * 500 and granted == budget.retries
    assert granted >= 0.2 * 500 - 1  # and it does retry that fraction


def test_pushback_replaces_the_backoff_and_negative_means_stop():
    retries = CallRetries(RetryPolicy(initial_backoff_s=5.0), RetryBudget(0.2, 10.0), None)
    assert 0.3 <= retries.next_delay("RESOURCE_EXHAUSTED", "full", 300) <= 0.36
    assert retries.next_delay("RESOURCE_EXHAUSTED", "full", -1) is None
    assert pushback_ms([("grpc-retry-pushback-ms", "250"), ("x", "y")]) == 250
    assert pushback_ms([("grpc-retry-pushback-ms", "soon")]) == -1
    assert pushback_ms([]) is None and pushback_ms(None) is None


def test_retries_stay_within_the_call_timeout():
    retries = CallRetries(RetryPolicy(initial_backoff_s=1.0), RetryBudget(0.2, 10.0), 0.2)
    assert retries.next_delay("UNAVAILABLE", "down", None) is None  # would overrun the deadline
    retries = CallRetries(RetryPolicy(max_retries=1, initial_backoff_s=0.0), RetryBudget(0.2, 10.0), None)
    assert retries.next_delay("UNAVAILABLE", "down", None) == 0.0
    assert retries.next_delay("UNAVAILABLE", "down", None) is None and retries.attempts == 2


def test_esmc_error_prints_its_status_once():
    error = ESMCError("INVALID_ARGUMENT", "INVALID_ARGUMENT: bad residue")
    assert str(error) == "INVALID_ARGUMENT: bad residue" and error.message == "bad residue"
    again = pickle.loads(pickle.dumps(ESMCError("UNAVAILABLE", "down", attempts=3, pushback_ms=5)))
    assert (again.code, again.message, again.attempts, again.pushback_ms) == ("UNAVAILABLE", "down", 3, 5)


def test_broken_stream_retries_or_fails_the_unanswered_only():
    (chunk,) = make_chunks([("a", "MK"), ("b", "LV")], 8, RetryPolicy(max_retries=1))
    chunk.to_send()
    chunk.on_response(_ok("0", 1.0))
    assert chunk.on_stream_end(ESMCError("UNAVAILABLE", "connection reset")) == []
    assert [r.id for r in chunk.to_send()] == ["1"]
    (index, result), = chunk.on_stream_end(ESMCError("DEADLINE_EXCEEDED", "too slow"))
    assert index == 1 and result.error.code == "DEADLINE_EXCEEDED" and result.id == "b"
    assert chunk.next_wait() is None
