"""Variant parsing and planning take time linear in the input: counted in executed lines of
``esmc.scoring`` (with ``sys.settrace``), never timed, so the test is exact on any machine."""

from __future__ import annotations

import sys

import pytest
import torch

from esmc import scoring
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
