"""The shipped esmc-tiny: small enough to ship, and better than the unigram baseline on
proteins it never saw (the held-out 10%, split by protein with a fixed seed)."""

import pytest
from esmc import ESMC
from esmc.training.data import load_split, unigram_log_probs
from esmc.training.evaluate import masked_perplexity
from esmc.weights import SHIPPED_DIR

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def split():
    return load_split()


def test_shipped_weights_are_small():
    path = SHIPPED_DIR / "esmc-tiny.safetensors"
    assert path.stat().st_size < 20 * 1024 * 1024
    model = ESMC.from_pretrained("esmc-tiny")
    assert sum(p.numel() for p in model.parameters()) < 5_000_000


def test_split_is_by_protein_and_disjoint(split):
    assert not set(split.train) & set(split.heldout)
    total = len(split.train) + len(split.heldout)
    assert len(split.heldout) == int(total * 0.1)
    assert load_split().heldout[:5] == split.heldout[:5]  # fixed seed


def test_beats_unigram_on_heldout_proteins(split):
    model = ESMC.from_pretrained("esmc-tiny", device="cpu")
    report = masked_perplexity(model, split.heldout[:300], unigram_log_probs(split.train))
    assert report.masked_tokens > 10_000
    assert report.unigram < report.uniform
    assert report.model < report.unigram, report
