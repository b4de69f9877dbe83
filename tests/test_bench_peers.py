"""benchmarks.bench_peers puts the same weights in the official ``esm`` ESMC, ``transformers``'
EsmcForMaskedLM and this project's ESMC: their logits agree (a timing-free check of the table's
last column and of the weight mapping)."""

from __future__ import annotations

import pytest

from benchmarks import bench_peers

pytestmark = pytest.mark.parity


def test_peers_agree_on_the_same_weights(tmp_path):
    fasta = tmp_path / "p.fasta"
    fasta.write_text(">a\nMKTAYIAKQRQISFVKSHFSRQ\n>b\nMLKNVQVLV\n>c\nACDEFGHIKLMNPQRSTVWYACDEFG\n")
    payload = bench_peers.main([
        "--config", "esmc-tiny", "--fasta", str(fasta), "--proteins", "3", "--rounds", "1",
        "--batch-size", "2",
        "--ways", "esm-one,esm-batch,hf-one,hf-batch,esmc-one,esmc-packed,ceiling-one,ceiling-packed",
    ])
    rows = {r["way"]: r for r in payload["rows"]}
    assert payload["residues"] == 22 + 9 + 26
    for way in ("esm-one", "esm-batch", "hf-one", "hf-batch", "esmc-one", "esmc-packed"):
        assert rows[way]["agreement"] <= 1e-5, way
        assert rows[way]["residues_per_s"] > 0
    assert rows["esm-one"]["agreement"] == 0.0  # the reference itself
    assert rows["ceiling-one"]["agreement"] is None and rows["ceiling-one"]["of_ceiling"] == 1.0


def test_every_model_runs_in_the_requested_dtype(tmp_path):
    """In a bfloat16 run the peers hold bfloat16 weights too (loading a state dict keeps a
    module's own float32: the peers once ran float32 in "bfloat16" tables), and every row
    differs from the float32 reference by bf16 rounding, not by nothing."""
    fasta = tmp_path / "p.fasta"
    fasta.write_text(">a\nMKTAYIAKQRQISFVKSHFSRQ\n>b\nMLKNVQVLV\n")
    payload = bench_peers.main([
        "--config", "esmc-tiny", "--fasta", str(fasta), "--proteins", "2", "--rounds", "1",
        "--dtype", "bfloat16", "--ways", "esm-one,hf-one,esmc-one,esmc-packed",
    ])
    assert payload["weights_dtypes"] == {"esmc": "bfloat16", "esm": "bfloat16", "hf": "bfloat16"}
    for row in payload["rows"]:
        assert 1e-4 < row["agreement"] < 5e-2, row["way"]



FASTA3 = ">a\nMKTAYIAKQRQISFVKSHFSRQ\n>b\nMLKNVQVLV\n>c\nACDEFGHIKLMNPQRSTVWYACDEFG\n"


def test_faesm_agrees_with_the_reference(tmp_path):
    """faesm (imported offline: its hub tokenizer replaced by the pad id) agrees like the
    other peers. faesm is an optional peer (``pip install --no-deps faesm``)."""
    pytest.importorskip("einops")
    pytest.importorskip("faesm")
    fasta = tmp_path / "p.fasta"
    fasta.write_text(FASTA3)
    payload = bench_peers.main([
        "--config", "esmc-tiny", "--fasta", str(fasta), "--proteins", "3", "--rounds", "1",
        "--batch-size", "2", "--ways", "faesm-one,faesm-batch",
    ])
    rows = {r["way"]: r for r in payload["rows"]}
    assert rows["faesm-one"]["agreement"] <= 1e-5 and rows["faesm-batch"]["agreement"] <= 1e-5


def test_int8_rows_hold_int8_and_record_the_load(tmp_path):
    """The int8 rows differ from the float32 reference by int8 rounding: not by nothing, not
    by more than a few percent."""
    fasta = tmp_path / "p.fasta"
    fasta.write_text(FASTA3)
    payload = bench_peers.main([
        "--config", "esmc-tiny", "--fasta", str(fasta), "--proteins", "3", "--rounds", "1",
        "--ways", "esmc-one,int8-one,int8-packed",
    ])
    rows = {r["way"]: r for r in payload["rows"]}
    assert payload["weights_dtypes"] == {"esmc": "float32", "int8": "int8"}
    for way in ("int8-one", "int8-packed"):
        assert 1e-4 < rows[way]["agreement"] < 0.1, way
    assert rows["esmc-one"]["agreement"] <= 1e-5
    assert "load average" in payload["load"]
