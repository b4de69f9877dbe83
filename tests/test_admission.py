"""Admission by cost on made-up calls: no model, no server."""

import pytest
import torch

from esmc.scoring import plan_pseudo_log_likelihood
from esmc.types import GenerationConfig, LogitsConfig
from esmc_server.admission import Admission, AdmissionLimits, OverBudget
from esmc_server.calls import Caller, generate_call, logits_call, score_call
from esmc_server.errors import InvalidRequest

pytestmark = pytest.mark.unit

LIMITS = AdmissionLimits(
    max_request_token_forwards=1000, max_caller_token_forwards=1500, max_inflight_token_forwards=2500
)


def logits(n, caller="a"):
    return logits_call(torch.zeros(n, dtype=torch.long), LogitsConfig(sequence=True), (),
                       caller=Caller(caller))


def test_costs_of_each_kind_of_call():
    assert logits(102).cost.token_forwards == 102
    masked = torch.tensor([0] + [32] * 50 + [2])  # 50 masks
    many = generate_call(masked, GenerationConfig(num_steps=500), 0)
    assert (many.cost.tokens, many.cost.forwards) == (52, 50)  # steps clamped to the masks
    few = generate_call(masked, GenerationConfig(num_steps=8), 0)
    assert few.cost.token_forwards == 8 * 52
    plan = plan_pseudo_log_likelihood("MKTAYIAKQR", "full", 100)
    assert score_call(plan).cost.token_forwards == 10 * 12  # L copies of L + 2 tokens


def test_a_request_over_the_limit_is_refused_naming_cost_limit_and_flag():
    admission = Admission(LIMITS)
    with pytest.raises(InvalidRequest) as refused:
        admission.admit(logits(1001))
    message = str(refused.value)
    assert "1,001 token-forwards" in message and "1,000" in message
    assert "--max-request-token-forwards" in message
    assert admission.in_flight == 0


def test_callers_in_flight_are_bounded_and_released():
    admission = Admission(LIMITS)
    first = admission.admit(logits(900))
    with pytest.raises(OverBudget, match="max_caller_token_forwards") as refused:
        admission.admit(logits(700))
    assert refused.value.code == "RESOURCE_EXHAUSTED" and refused.value.retry_pushback_ms > 0
    other = admission.admit(logits(900, caller="b"))  # another caller is not held back
    with pytest.raises(OverBudget, match="max_inflight_token_forwards"):
        admission.admit(logits(800, caller="c"))
    first.release()
    first.release()  # idempotent
    assert admission.caller_in_flight("a") == 0 and admission.in_flight == 900
    with admission.admit(logits(700)):
        assert admission.in_flight == 1600
    other.release()
    assert admission.in_flight == 0


def test_a_caller_with_nothing_in_flight_gets_any_request_within_the_limit():
    small = AdmissionLimits(max_request_token_forwards=1000, max_caller_token_forwards=10,
                            max_inflight_token_forwards=10)
    admission = Admission(small)
    with admission.admit(logits(1000)):
        with pytest.raises(OverBudget):
            admission.admit(logits(1))


def test_the_start_check_caps_the_forward_length():
    admission = Admission(LIMITS)
    admission.cap_forward(100, "a forward took too long")
    with pytest.raises(InvalidRequest, match="a forward took too long"):
        admission.admit(logits(101))
    admission.admit(logits(100)).release()
