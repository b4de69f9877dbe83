"""``python -m benchmarks.gpu_suite --dry-run``: the GPU suite's every step on tiny shapes on the
CPU, so that the one GPU command cannot rot between the runs where a GPU is at hand."""

from __future__ import annotations

import json

import pytest

from benchmarks import gpu_suite

pytestmark = pytest.mark.e2e
STEPS = ["parity-float32", "peers-bfloat16", "forward", "load-mean", "load-logits"]


def test_dry_run_runs_every_step_and_writes_every_table(tmp_path):
    status = gpu_suite.main(["--dry-run", "--out", str(tmp_path)])
    summary = json.loads((tmp_path / "gpu_cpu-dry-run_summary.json").read_text())
    assert [s["step"] for s in summary] == STEPS
    assert [s["error"] for s in summary] == [None] * len(STEPS)
    assert status == 0
    for step in STEPS:
        table = (tmp_path / f"gpu_cpu-dry-run_{step}.md").read_text()
        assert table.startswith("`python -m benchmarks.") and "| " in table, step
        assert "CPU" in table  # the device line names the hardware
        payload = json.loads((tmp_path / f"gpu_cpu-dry-run_{step}.json").read_text())
        assert payload["rows"], step
    peers = json.loads((tmp_path / "gpu_cpu-dry-run_parity-float32.json").read_text())
    ways = {r["way"]: r for r in peers["rows"]}
    assert {"esm-one", "hf-one", "faesm-one", "esmc-one", "esmc-packed"} <= set(ways) or (
        "faesm-one" not in ways  # faesm is optional
    )
    assert max(ways[w]["agreement"] for w in ("esmc-one", "esmc-packed")) <= 1e-5
    load = json.loads((tmp_path / "gpu_cpu-dry-run_load-logits.json").read_text())
    assert load["clients"] == 4 and load["output"] == "logits"
    assert load["rows"][0]["proteins"] == 6
    summary_md = (tmp_path / "gpu_cpu-dry-run_summary.md").read_text()
    assert "FAILED" not in summary_md and "parity" in summary_md


def test_a_failing_step_is_reported_and_fails_the_suite(tmp_path):
    failing = gpu_suite.run_step(
        "broken", gpu_suite.bench_forward.main, ["--config", "no-such-model"], tmp_path, "x"
    )
    assert failing["error"] and "no-such-model" in failing["error"]
    lines = gpu_suite.summary_lines([failing], "cpu", 1.0, 480.0)
    assert any("FAILED" in line for line in lines)
