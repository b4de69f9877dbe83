"""Variant parsing and planning take time linear in the input: counted in executed lines of
``esmc.scoring`` (with ``sys.settrace``), never timed, so the test is exact on any machine."""

from __future__ import annotations

import sys
import threading

import pytest
import torch
from helpers.inprocess import running_server, server_config
from helpers.models import seeded_model

from esmc import scoring
from esmc_proto.v1 import esmc_pb2 as pb
from esmc_server import scoring as server_scoring
from esmc.scoring import VariantError, parse_variant, plan_scores

pytestmark = pytest.mark.unit

LETTERS = "ACDEFGHIKLMNPQRSTVWY"


def lines_run(function, *args, **kwargs) -> int:
    """Lines of esmc/scoring.py executed by ``function(*args, **kwargs)``."""
    return traced(function, *args, **kwargs)["line"]


def traced(function, *args, **kwargs) -> dict[str, int]:
    """Events in esmc/scoring.py while ``function`` runs: executed lines (``"line"``) and calls
    by function name."""
    counts: dict[str, int] = {"line": 0}
    source = scoring.__file__

    def tracer(frame, event, arg):
        if frame.f_code.co_filename != source:
            return None
        if event == "line":
            counts["line"] += 1
        elif event == "call":
            counts[frame.f_code.co_name] = counts.get(frame.f_code.co_name, 0) + 1
        return tracer

    sys.settrace(tracer)
    try:
        function(*args, **kwargs)
    except VariantError:
        pass
    finally:
        sys.settrace(None)
    return counts


def wild_type(length: int) -> str:
    return "".join(LETTERS[i % 20] for i in range(length))


def substituting(sequence: str, positions: range) -> str:
    return ":".join(f"{sequence[i]}{i + 1}{'A' if sequence[i] != 'A' else 'C'}" for i in positions)


def test_one_variant_substituting_many_residues_parses_in_linear_lines():
    """The repeated-position check is a set lookup: doubling the substitutions doubles the
    work (a pairwise check made it four times, 16,384 substitutions blocked a server 5 s)."""
    small, large = (lines_run(parse_variant, substituting(wild_type(n), range(n)), wild_type(n))
                    for n in (1000, 2000))
    assert large < 2.2 * small, (small, large)
    assert large < 40 * 2000


def test_a_repeat_is_still_refused_at_the_end_of_a_long_variant():
    sequence = wild_type(3000)
    text = substituting(sequence, range(3000)) + f":{sequence[5]}6A"
    with pytest.raises(VariantError, match="position 6 is substituted twice"):
        parse_variant(text, sequence)


def test_many_copies_of_one_mutant_are_applied_once_in_pseudo_likelihood_plans():
    """Applying a mutant costs O(L): PLL planning and reducing apply each distinct mutant
    once, not once per variant that names it."""
    sequence = wild_type(500)
    plan = plan_scores(sequence, ["C2A"] * 300 + ["D3A"] * 300, "pseudo-likelihood")
    assert traced(plan_scores, sequence, ["C2A"] * 300 + ["D3A"] * 300, "pseudo-likelihood")[
        "apply"
    ] == 2
    reads = [torch.zeros(len(c.reads), 64) for c in plan.copies]
    assert traced(plan.reduce, reads)["apply"] == 2


@pytest.mark.e2e
async def test_a_large_score_variants_request_is_planned_off_the_event_loop(monkeypatch):
    """Where the work runs, not how long it takes: a request of many variants is parsed and
    planned on a thread other than the event loop's; a small one stays on the loop."""
    threads: list[str] = []
    plan = server_scoring.score_plan

    def recording(*args):
        threads.append(threading.current_thread().name)
        return plan(*args)

    monkeypatch.setattr(server_scoring, "score_plan", recording)
    sequence = wild_type(300)
    many = [f"{sequence[i]}{i + 1}{a}" for i in range(300) for a in "AC" if a != sequence[i]]
    model = seeded_model(d_model=64, n_heads=1, n_layers=2, seed=5)
    async with running_server(model, server_config(max_wait_ms=1)) as running:
        for variants in (many * 8, many[:3]):
            reply = await running.stub.ScoreVariants(
                pb.ScoreVariantsRequest(
                    wild_type=pb.ESMProtein(sequence=sequence), variants=variants,
                    method=pb.WT_MARGINALS,
                ),
                timeout=120,
            )
            assert reply.scores.shape == [len(variants)]
    loop = threading.current_thread().name
    assert threads[0] != loop and threads[1] == loop, threads
