"""Variant scores and pseudo-log-likelihoods (esmc.scoring): parsing, plans, and parity with a
direct loop over the official ``esm`` ESMC on the same random weights (float32).

The reference loop is the obvious one: one forward of the reference model per masked copy,
tokens from the reference tokenizer, ``log_softmax`` over the 64 logits, no sharing of copies.
Tolerance: relative error (max |ours - reference| / max |reference|) <= 1e-5.
"""

from __future__ import annotations

import math

import pytest
import torch

from esmc import scoring
from esmc.scoring import AMINO_ACIDS, VariantError, parse_variant, plan_scores
from helpers.models import TINY, random_model, random_sequences, reference_esmc, rel_err

TOLERANCE = 1e-5
WILD_TYPE = random_sequences([37], seed=5)[0]


@pytest.fixture(scope="module")
def model():
    return random_model(TINY, seed=3)


@pytest.fixture(scope="module")
def reference(model):
    return reference_esmc(TINY, model.state_dict())


@pytest.fixture(scope="module")
def ref_tokenizer():
    import esm.sdk  # noqa: F401
    from esm.tokenization import get_esmc_model_tokenizers

    return get_esmc_model_tokenizers()


def mutants_of(wt: str, picks: list[list[tuple[int, str]]]) -> list[str]:
    """Variant strings (1-based) from (0-based index, mutant letter) lists."""
    return [":".join(f"{wt[i]}{i + 1}{aa}" for i, aa in subs) for subs in picks]


SINGLES = [[(0, "A")], [(4, "W")], [(4, "C")], [(20, "P")], [(36, "K")], [(11, WILD_TYPE[11])]]
MULTIS = [[(2, "D"), (9, "L")], [(4, "W"), (30, "G"), (33, "Y")], [(9, "R"), (2, "E")]]
VARIANTS = mutants_of(WILD_TYPE, SINGLES + MULTIS)


# -- the obvious reference loop ------------------------------------------------------------------


def ref_log_probs(reference, tok, sequence: str, masked: list[int], aa_only: bool = False):
    """One reference forward with residues ``masked`` (0-based) masked: (L+2, 64) log-probs."""
    ids = torch.tensor(tok.encode(sequence))
    for i in masked:
        ids[i + 1] = tok.mask_token_id
    with torch.no_grad():
        logits = reference(sequence_tokens=ids[None]).sequence_logits[0].float()
    if aa_only:
        cols = [tok.convert_tokens_to_ids(a) for a in AMINO_ACIDS]
        out = torch.full_like(logits, -math.inf)
        out[:, cols] = torch.log_softmax(logits[:, cols], -1)
        return out
    return torch.log_softmax(logits, -1)


def split(variant: str) -> list[tuple[str, int, str]]:
    return [(m[0], int(m[1:-1]), m[-1]) for m in variant.split(":")]


def ref_marginal_score(reference, tok, wt, variant, method, joint=False, aa_only=False):
    subs = split(variant)
    idx = tok.convert_tokens_to_ids
    score = 0.0
    for w, p, m in subs:
        if method == "wt-marginals":
            masked = []
        elif joint:
            masked = [q - 1 for _, q, _ in subs]
        else:
            masked = [p - 1]
        lp = ref_log_probs(reference, tok, wt, masked, aa_only)
        score += (lp[p, idx(m)] - lp[p, idx(w)]).item()
    return score


def ref_pll(reference, tok, sequence: str) -> tuple[float, list[float]]:
    terms = []
    for i, a in enumerate(sequence):
        lp = ref_log_probs(reference, tok, sequence, [i])
        terms.append(lp[i + 1, tok.convert_tokens_to_ids(a)].item())
    return sum(terms), terms


def apply(wt: str, variant: str) -> str:
    seq = list(wt)
    for _, p, m in split(variant):
        seq[p - 1] = m
    return "".join(seq)


def assert_close(ours, theirs) -> None:
    ours, theirs = torch.as_tensor(ours).double(), torch.as_tensor(theirs).double()
    assert ours.shape == theirs.shape
    assert theirs.abs().max() > 0.05  # the comparison means something
    assert rel_err(ours, theirs) <= TOLERANCE


# -- parity ------------------------------------------------------------------------------------


@pytest.mark.parity
@pytest.mark.parametrize(
    ("method", "joint"),
    [("wt-marginals", False), ("masked-marginals", False), ("masked-marginals", True)],
)
def test_marginal_scores_match_reference_loop(model, reference, ref_tokenizer, method, joint):
    ours = scoring.score_variants(model, WILD_TYPE, VARIANTS, method, joint_masking=joint)
    theirs = [
        ref_marginal_score(reference, ref_tokenizer, WILD_TYPE, v, method, joint) for v in VARIANTS
    ]
    assert_close(ours, theirs)
    assert ours[5] == 0  # a synonymous substitution scores 0


@pytest.mark.parity
def test_joint_masking_changes_only_multi_substitution_scores(model):
    apart = scoring.score_variants(model, WILD_TYPE, VARIANTS, "masked-marginals")
    joint = scoring.score_variants(model, WILD_TYPE, VARIANTS, joint_masking=True)
    n = len(SINGLES)
    assert torch.equal(apart[:n], joint[:n])
    assert (apart[n:] - joint[n:]).abs().min() > 1e-4


@pytest.mark.parity
def test_amino_acid_renormalisation_matches_reference_loop(model, reference, ref_tokenizer):
    ours = scoring.score_variants(model, WILD_TYPE, VARIANTS, normalization="amino-acids")
    theirs = [
        ref_marginal_score(
            reference, ref_tokenizer, WILD_TYPE, v, "masked-marginals", aa_only=True
        )
        for v in VARIANTS
    ]
    assert_close(ours, theirs)
    # a log-ratio at one position does not depend on the normaliser, which cancels ...
    full = scoring.score_variants(model, WILD_TYPE, VARIANTS)
    assert torch.allclose(ours, full, rtol=0, atol=1e-5)
    # ... but absolute log-probabilities (the pseudo-log-likelihood) do
    wt = WILD_TYPE[:10]
    renormalised = scoring.pseudo_log_likelihood(model, wt, normalization="amino-acids")
    terms = [
        ref_log_probs(reference, ref_tokenizer, wt, [i], aa_only=True)[
            i + 1, ref_tokenizer.convert_tokens_to_ids(a)
        ].item()
        for i, a in enumerate(wt)
    ]
    assert_close(renormalised.position_log_probs, terms)
    plain = scoring.pseudo_log_likelihood(model, wt)
    assert renormalised.pseudo_log_likelihood > plain.pseudo_log_likelihood + 1e-3


@pytest.mark.parity
def test_pseudo_likelihood_matches_reference_loop(model, reference, ref_tokenizer):
    wt = WILD_TYPE[:16]
    variants = mutants_of(wt, [[(0, "C")], [(2, "W"), (7, "G")]])
    result = scoring.pseudo_log_likelihood(model, wt)
    pll, terms = ref_pll(reference, ref_tokenizer, wt)
    assert_close(result.position_log_probs, terms)
    assert abs(result.pseudo_log_likelihood - pll) <= TOLERANCE * abs(pll)
    assert result.pseudo_perplexity == pytest.approx(math.exp(-pll / len(wt)), rel=1e-5)
    scores = scoring.score_variants(model, wt, variants, "pseudo-likelihood")
    theirs = [ref_pll(reference, ref_tokenizer, apply(wt, v))[0] - pll for v in variants]
    assert_close(scores, theirs)


@pytest.mark.parity
@pytest.mark.parametrize("method", ["wt-marginals", "masked-marginals"])
def test_saturation_map_matches_reference_loop(model, reference, ref_tokenizer, method):
    wt = WILD_TYPE[:12]
    table = scoring.saturation_map(model, wt, method)
    assert table.shape == (len(wt), 20)
    idx = ref_tokenizer.convert_tokens_to_ids
    expected = torch.zeros(len(wt), 20, dtype=torch.float64)
    for i, w in enumerate(wt):
        lp = ref_log_probs(reference, ref_tokenizer, wt, [] if method == "wt-marginals" else [i])
        for j, aa in enumerate(AMINO_ACIDS):
            expected[i, j] = (lp[i + 1, idx(aa)] - lp[i + 1, idx(w)]).item()
    assert_close(table, expected)
    wt_columns = torch.tensor([AMINO_ACIDS.index(a) for a in wt])
    assert torch.all(table.gather(1, wt_columns[:, None]) == 0)
    # the table is the single-substitution scores, position-major, wild type skipped
    singles = scoring.all_single_substitutions(wt)
    scores = scoring.score_variants(model, wt, singles, method)
    off_diagonal = [
        table[i, j] for i, w in enumerate(wt) for j, a in enumerate(AMINO_ACIDS) if a != w
    ]
    assert torch.allclose(torch.stack(off_diagonal), scores, rtol=0, atol=1e-5)


def test_packing_does_not_change_scores(model):
    """Copies packed many per forward give the scores of one copy per forward."""
    packed = scoring.score_variants(model, WILD_TYPE, VARIANTS, max_batch_tokens=4096)
    alone = scoring.score_variants(model, WILD_TYPE, VARIANTS, max_batch_tokens=1)
    assert torch.allclose(packed, alone, rtol=0, atol=1e-5)


# -- plans -------------------------------------------------------------------------------------


def test_plan_needs_only_touched_positions():
    plan = plan_scores(WILD_TYPE, VARIANTS, "masked-marginals")
    touched = {i for subs in SINGLES + MULTIS for i, _ in subs}
    assert sorted(c.masked for c in plan.copies) == sorted((i,) for i in touched)
    assert all(c.reads == c.masked for c in plan.copies)
    joint = plan_scores(WILD_TYPE, VARIANTS, "masked-marginals", joint_masking=True)
    singles = {(i,) for subs in SINGLES for i, _ in subs}
    multis = {tuple(sorted(i for i, _ in subs)) for subs in MULTIS}
    assert {c.masked for c in joint.copies} == singles | multis
    wt = plan_scores(WILD_TYPE, VARIANTS, "wt-marginals")
    assert [c.masked for c in wt.copies] == [()] and set(wt.copies[0].reads) == touched


def test_plan_tokens_mask_the_copy_positions():
    plan = plan_scores(WILD_TYPE, VARIANTS[6:7], joint_masking=True)
    (copy,) = plan.copies
    tokens = plan.tokens(0)
    assert tokens.shape == (len(WILD_TYPE) + 2,)
    assert [i - 1 for i in (tokens == 32).nonzero().flatten().tolist()] == list(copy.masked)


def test_pseudo_likelihood_plan_counts():
    wt = WILD_TYPE[:10]
    variants = mutants_of(wt, [[(0, "C")], [(0, "C")], [(3, wt[3])], [(1, "W"), (5, "G")]])
    plan = plan_scores(wt, variants, "pseudo-likelihood")
    # wild type + 2 distinct mutants (a duplicate and a synonymous variant cost nothing)
    assert len(plan.sequences) == 3
    assert len(plan.copies) == 3 * len(wt)
    assert plan.total_tokens == 3 * len(wt) * (len(wt) + 2)


def test_saturation_plan_covers_every_position():
    plan = plan_scores(WILD_TYPE, [], saturation_map=True)
    assert len(plan.copies) == len(WILD_TYPE)
    assert len(scoring.all_single_substitutions(WILD_TYPE)) == 19 * len(WILD_TYPE)


# -- parsing -----------------------------------------------------------------------------------


def test_parse_positions_offset_and_multi():
    wt = "MKTAYIAK"
    v = parse_variant("K2P:A4D", wt)
    subs = [(s.wild_type, s.index, s.mutant) for s in v.substitutions]
    assert subs == [("K", 1, "P"), ("A", 3, "D")]
    assert v.apply(wt) == "MPTDYIAK"
    assert parse_variant("K102P", wt, offset=100).substitutions[0].index == 1
    assert parse_variant("M0A", wt, offset=-1).substitutions[0].index == 0
    assert parse_variant(" T3S ", wt).positions == (2,)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("K2", "cannot parse 'K2'"),
        ("2P", "cannot parse '2P'"),
        ("", "cannot parse ''"),
        ("K2P:", "cannot parse ''"),
        ("Q2P", "wild-type letter Q at position 2 does not match the sequence, which has K"),
        ("K9P", "position 9 is out of range: the wild type has 8 residues, numbered 1..8"),
        ("M0P", "position 0 is out of range"),
        ("K2*", "'*' is not an amino acid"),
        ("K2X", "'X' is not an amino acid"),
        ("K2P:K2A", "position 2 is substituted twice"),
    ],
)
def test_parse_errors_name_the_variant(text, message):
    with pytest.raises(VariantError, match="variant") as info:
        parse_variant(text, "MKTAYIAK")
    assert str(info.value).startswith(f"variant {text!r}: ")
    assert message in str(info.value)
    assert info.value.variant == text


def test_plan_rejects_bad_options():
    with pytest.raises(ValueError, match="unknown method"):
        plan_scores("MKT", ["K2A"], "esm1v")
    with pytest.raises(ValueError, match="unknown normalization"):
        plan_scores("MKT", ["K2A"], normalization="softmax")
    with pytest.raises(ValueError, match="without masks"):
        plan_scores("MK_T", [])
    with pytest.raises(ValueError, match="residue 2 is X"):
        plan_scores("MXT", [], normalization="amino-acids")
    with pytest.raises(VariantError, match="'K2A:Q3A'"):
        plan_scores("MKT", ["K2A", "K2A:Q3A"])


def test_plan_size_limit_is_checked_before_building():
    wt = WILD_TYPE
    singles = scoring.all_single_substitutions(wt)  # 19 L mutants: 19 L^2 + L copies by PLL
    with pytest.raises(scoring.PlanTooLarge, match=f"{len(singles)} variant") as info:
        plan_scores(wt, singles, "pseudo-likelihood", max_copies=1000)
    assert info.value.copies == (len(singles) + 1) * len(wt)
    assert "the limit is 1000 per request" in str(info.value)
    plan = plan_scores(wt, singles, "masked-marginals", max_copies=len(wt))
    assert len(plan.copies) == len(wt)
    with pytest.raises(scoring.PlanTooLarge):
        plan_scores(wt, singles, "masked-marginals", max_copies=len(wt) - 1)
