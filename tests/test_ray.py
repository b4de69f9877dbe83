"""``esmc ray-embed`` on a local Ray instance (issue 12).

Against two real ``esmc serve`` replicas: the whole proteome, one replica killed with
SIGKILL mid-job, every id exactly once and equal to ``esmc embed`` against one server, then
a second run that computes nothing. In-process model actors on a subset: per-residue rows
of a hidden layer equal to the library's, a bad sequence's error in its row, resume after a
partial run. The model is a random one-layer d=64 ESMC (the whole proteome in seconds).
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
pytest.importorskip("pyarrow.csv")

import torch  # noqa: E402

from esmc import ESMC, ESMCConfig  # noqa: E402
from esmc.tokenizer import encode  # noqa: E402
from esmc.types import ESMProteinTensor, LogitsConfig  # noqa: E402
from esmc.weights import save_safetensors  # noqa: E402
from esmc_client.cli import main  # noqa: E402
from esmc_client.fasta import read_fasta  # noqa: E402
from esmc_ray import embed_with_servers  # noqa: E402
from esmc_ray.cli import client_options, embed_parser  # noqa: E402
from helpers.data import proteome_path  # noqa: E402
from helpers.metrics import requests_served  # noqa: E402
from helpers.processes import ServeProcess  # noqa: E402

pytestmark = pytest.mark.e2e

CONFIG = ESMCConfig(d_model=64, n_heads=1, n_layers=1)
SERVE_OPTIONS = ["--max-length", "8192"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "model.safetensors"
    with torch.random.fork_rng():
        torch.manual_seed(0)
        save_safetensors(ESMC(CONFIG), path)
    return path


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def proteome() -> Path:
    return proteome_path()


def read_output(directory: Path) -> pa.Table:
    return pq.read_table(directory)


def part_files(directory: Path) -> dict[str, float]:
    return {p.name: p.stat().st_mtime for p in directory.iterdir()}


def test_servers_whole_proteome_survives_a_killed_replica_and_resumes(
    weights, local_ray, proteome, tmp_path
):
    records = dict(read_fasta(proteome))
    limit = 8190
    too_long = {uid for uid, seq in records.items() if len(seq) > limit}
    a = ServeProcess(str(weights), SERVE_OPTIONS).start()
    b = ServeProcess(str(weights), SERVE_OPTIONS).start()
    try:
        a.wait_serving(), b.wait_serving()
        reference = tmp_path / "reference.parquet"
        subprocess.run(
            [sys.executable, "-m", "esmc_client.cli", "embed", str(proteome), "-o", str(reference),
             "--target", a.target, "--no-progress"],
            check=False, capture_output=True, timeout=300,
        )
        out = tmp_path / "out"
        killed = threading.Event()
        served_by_b = []

        def kill_b_mid_job():
            while not killed.is_set():
                if out.is_dir() and any(p.suffix == ".parquet" for p in out.iterdir()):
                    served_by_b.append(requests_served(b.metrics(), "Embed"))
                    b.kill()
                    killed.set()
                time.sleep(0.05)

        watcher = threading.Thread(target=kill_b_mid_job)
        watcher.start()
        try:
            summary = embed_with_servers(
                [str(proteome)], str(out), [a.target, b.target], batch_size=64, concurrency=2
            )
        finally:
            killed.set()
            watcher.join()
        assert served_by_b and served_by_b[0] > 0  # b took part before it was killed
        assert b.process.returncode == -9
        assert (summary.written, summary.unfinished, summary.duplicates) == (len(records), 0, 0)
        assert summary.errors == len(too_long)

        table = read_output(out)
        ids = table["id"].to_pylist()
        assert len(ids) == len(set(ids)) == len(records) and set(ids) == set(records)
        errors = {uid: e for uid, e in zip(ids, table["error"].to_pylist()) if e is not None}
        assert set(errors) == too_long and all("INVALID_ARGUMENT" in e for e in errors.values())
        lengths = dict(zip(ids, table["sequence_length"].to_pylist()))
        assert all(lengths[uid] == len(seq) for uid, seq in records.items())
        metadata = pq.read_schema(next(out.glob("*.parquet"))).metadata
        assert metadata[b"esmc.model"] == str(weights).encode()
        assert (metadata[b"esmc.layer"], metadata[b"esmc.pooling"]) == (b"-1", b"mean")
        assert metadata[b"esmc.server_version"] and metadata[b"esmc.d_model"] == b"64"

        expected = pq.read_table(reference)
        want = dict(zip(expected["id"].to_pylist(), expected["embedding"].to_pylist()))
        assert len(want) == len(records) - len(too_long)
        got = dict(zip(ids, table["embedding"].to_pylist()))
        assert table.schema.field("embedding").type == pa.list_(pa.float32(), 64)
        for uid, vector in want.items():
            np.testing.assert_allclose(got[uid], vector, rtol=1e-5, atol=1e-6)

        before = part_files(out)
        served_a = requests_served(a.metrics(), "Embed")
        argv = ["ray-embed", str(proteome), "-o", str(out), "--targets",
                f"{a.target},{b.target}", "--no-progress"]
        assert main(argv) == 0
        assert part_files(out) == before
        assert requests_served(a.metrics(), "Embed") == served_a  # computed nothing
    finally:
        a.stop(), b.kill()


def test_in_process_actors_hidden_layer_per_residue_and_resume(
    weights, local_ray, proteome, tmp_path
):
    records = [r for r in read_fasta(proteome) if len(r[1]) < 400][:24]
    records.append(("bad", "MKT1LV"))
    first, rest = records[:10], records[10:]
    csv = tmp_path / "first.csv"
    pa.csv.write_csv(pa.table({"name": [u for u, _ in first], "seq": [s for _, s in first]}), csv)
    shard = tmp_path / "rest.parquet"
    pq.write_table(pa.table({"name": [u for u, _ in rest], "seq": [s for _, s in rest]}), shard)
    out = tmp_path / "out"
    common = ["-o", str(out), "--in-process", "--model", str(weights), "--device", "cpu",
              "--layer", "0", "--pool", "none", "--id-column", "name", "--sequence-column", "seq",
              "--batch-size", "8", "--no-progress"]

    assert main(["ray-embed", str(csv), *common]) == 0
    assert sorted(read_output(out)["id"].to_pylist()) == sorted(u for u, _ in first)
    assert main(["ray-embed", str(csv), str(shard), *common]) == 1  # "bad" is an error row

    table = read_output(out)
    ids = table["id"].to_pylist()
    assert sorted(ids) == sorted(u for u, _ in records)
    rows = {uid: i for i, uid in enumerate(ids)}
    bad = rows["bad"]
    assert "INVALID_ARGUMENT" in table["error"][bad].as_py()
    assert table["embedding"][bad].as_py() is None and table["per_residue"][bad].as_py() is None
    model = ESMC.from_pretrained(str(weights), device="cpu", dtype=torch.float32)
    config = LogitsConfig(return_hidden_states=True, ith_hidden_layer=0)
    for uid, sequence in records[:-1]:
        hidden = model.logits(ESMProteinTensor(sequence=encode(sequence)), config)
        want = hidden.hidden_states[0, 0].numpy()  # (L+2, d): block 0's output
        got = np.array(table["per_residue"][rows[uid]].as_py(), np.float32)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        mean = np.array(table["embedding"][rows[uid]].as_py())
        np.testing.assert_allclose(mean, want[1:-1].mean(axis=0), rtol=1e-5, atol=1e-5)
        assert table["error"][rows[uid]].as_py() is None
    metadata = table.schema.metadata
    assert (metadata[b"esmc.mode"], metadata[b"esmc.layer"], metadata[b"esmc.pooling"]) == (
        b"in-process", b"0", b"none",
    )


def test_resume_refuses_another_layer(weights, local_ray, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    table = pa.table({"id": ["a"]}).replace_schema_metadata(
        {"esmc.model": str(weights), "esmc.layer": "-1", "esmc.pooling": "mean"}
    )
    pq.write_table(table, out / "part-x.parquet")
    fasta = tmp_path / "in.fasta"
    fasta.write_text(">a\nMKT\n>b\nMLV\n")
    argv = ["ray-embed", str(fasta), "-o", str(out), "--in-process", "--model", str(weights),
            "--layer", "0", "--no-progress"]
    assert main(argv) == 2


def test_ray_embed_arguments(monkeypatch):
    monkeypatch.delenv("ESMC_MODEL", raising=False)
    args = embed_parser().parse_args(
        ["a.fasta", "shards/", "-o", "out", "--targets", "h1:1,h2:2",
         "--concurrency", "4", "--layer", "-2", "--pool", "none", "--address", "ray://head:10001"]
    )
    assert (args.inputs, args.output, args.targets) == (["a.fasta", "shards/"], "out", "h1:1,h2:2")
    assert (args.concurrency, args.layer, args.pool, args.address) == (4, -2, "none", "ray://head:10001")
    assert not args.in_process and args.model is None  # servers: their default model
    assert client_options(embed_parser().parse_args(["a.fasta", "-o", "o", "--model", "m"])) == {
        "model": "m"}


def test_ray_score_variants_with_a_bad_variant_and_resume(weights, local_ray, proteome, tmp_path):
    from esmc_client import ESMCClient

    (id_a, wt_a), (id_b, wt_b) = [r for r in read_fasta(proteome) if len(r[1]) < 200][:2]
    variants = [(wt_a, f"{wt_a[i]}{i + 1}A") for i in range(1, 9)] + [
        (wt_b, f"{wt_b[i]}{i + 1}W:{wt_b[i + 2]}{i + 3}G") for i in range(1, 6)
    ]
    variants.append((wt_a, f"{'W' if wt_a[1] != 'W' else 'C'}2A"))  # wrong wild-type residue
    ids = [f"v{i}" for i in range(len(variants))]
    shard = tmp_path / "variants.parquet"
    pq.write_table(pa.table({
        "id": ids, "sequence": [wt for wt, _ in variants], "mutant": [v for _, v in variants],
    }), shard)
    out = tmp_path / "scores"
    with ServeProcess(str(weights), SERVE_OPTIONS) as server:
        argv = ["ray-score", str(shard), "-o", str(out), "--targets", server.target,
                "--variant-column", "mutant", "--batch-size", "8", "--no-progress"]
        assert main(argv) == 1  # one row has an error
        table = read_output(out)
        assert sorted(table["id"].to_pylist()) == sorted(ids)
        rows = {uid: i for i, uid in enumerate(table["id"].to_pylist())}
        assert "INVALID_ARGUMENT" in table["error"][rows[ids[-1]]].as_py()
        assert table["score"][rows[ids[-1]]].as_py() is None
        with ESMCClient(server.target) as client:
            for wt in (wt_a, wt_b):
                mine = [i for i, (w, _) in enumerate(variants[:-1]) if w == wt]
                want = client.score_variants(wt, [variants[i][1] for i in mine])
                got = [table["score"][rows[ids[i]]].as_py() for i in mine]
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        metadata = table.schema.metadata
        assert (metadata[b"esmc.kind"], metadata[b"esmc.method"]) == (b"variant-scores", b"masked-marginals")
        served = requests_served(server.metrics(), "ScoreVariants")
        assert main(argv) == 0  # resumed: nothing left
        assert requests_served(server.metrics(), "ScoreVariants") == served
