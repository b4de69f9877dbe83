"""Ray bulk-embedding benchmark: proteins/s of three ways to embed a FASTA file.

    python -m benchmarks.bench_ray --model esmc-tiny --fasta ../shared/data/proteome.fasta \
        --server-threads 1 --json out.json

- ``esmc embed``: one client (``ESMCClient.embed``, what ``esmc embed`` runs) against one
  ``esmc serve`` replica;
- ``ray-embed, N replicas``: :func:`esmc_ray.embed_with_servers` over ``--replicas``
  ``esmc serve`` processes, two client actors per replica;
- ``ray-embed in-process``: :func:`esmc_ray.embed_in_process`, ``--actors`` model
  actors each running the server's engine on the CPU (``--server-threads`` torch threads).

Every replica and actor gets ``--server-threads`` torch threads. Ray is started once
(``ray.init(num_cpus=...)``) before the timed runs; each timed run includes what a job pays
(reading the FASTA file, the actors' start-up and model load, writing parquet), not the
servers' start-up. Modes run in ``--rounds`` interleaved rounds and the best time is kept.
The table heading says what else ran on the machine: nothing here can know it, so pass
``--note``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from benchmarks import common

MODES = ("embed", "servers", "in-process")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_served_model_arguments(parser)
    parser.add_argument("--limit", type=int, default=None, help="first N proteins only")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--actors", type=int, default=2, help="in-process model actors")
    parser.add_argument("--ray-cpus", type=int, default=os.cpu_count(), help="ray.init(num_cpus)")
    parser.add_argument("--batch-size", type=int, default=64, help="sequences per actor call")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--note", default="", help="what else the machine ran, for the heading")
    args = parser.parse_args()
    modes = common.parse_modes(parser, args.modes, MODES)

    import ray

    from esmc_client import ESMCClient
    from esmc_ray import embed_in_process, embed_with_servers

    records = common.load_proteins(args.fasta, args.limit)
    residues = sum(len(s) for _, s in records)
    with tempfile.TemporaryDirectory() as scratch, ExitStack() as stack:
        scratch = Path(scratch)
        fasta = scratch / "input.fasta"
        fasta.write_text("".join(f">{uid}\n{seq}\n" for uid, seq in records))
        model, weights_note = common.weights_to_serve(args.model, args.weights, scratch)
        options = ["--max-batch-tokens", str(args.max_batch_tokens)] if args.max_batch_tokens else []
        options += ["--max-length", "16384"] if _serves_max_length() else []
        replicas = [
            stack.enter_context(common.serve(model, options, threads=args.server_threads))
            for _ in range(args.replicas if "servers" in modes else 1)
        ]
        ray.init(num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False)
        stack.callback(ray.shutdown)
        ray.data.DataContext.get_current().enable_progress_bars = False
        threads = args.server_threads

        def run(mode: str) -> tuple[float, int]:
            out = scratch / f"out-{mode}"
            shutil.rmtree(out, ignore_errors=True)
            start = time.perf_counter()
            if mode == "embed":
                with ESMCClient(replicas[0].target) as client:
                    done = sum(r.ok for r in client.embed(records, layer=-1, pool="mean"))
            elif mode == "servers":
                summary = embed_with_servers(
                    [str(fasta)], str(out), [r.target for r in replicas],
                    batch_size=args.batch_size,
                )
                done = summary.written - summary.errors
            else:
                embedder = {"device": args.device, "dtype": args.dtype, "threads": threads}
                summary = embed_in_process(
                    [str(fasta)], str(out), model, embedder_options=embedder,
                    concurrency=args.actors, batch_size=args.batch_size,
                )
                done = summary.written - summary.errors
            return time.perf_counter() - start, done

        best: dict[str, tuple[float, int]] = {}
        for _ in range(args.rounds):
            for mode in modes:
                seconds, done = run(mode)
                if mode not in best or seconds < best[mode][0]:
                    best[mode] = (seconds, done)

    names = {
        "embed": "esmc embed: one client, one replica",
        "servers": f"esmc ray-embed: {args.replicas} replicas, {2 * args.replicas} client actors",
        "in-process": f"esmc ray-embed --in-process: {args.actors} model actors",
    }
    base = best[modes[0]][0]
    rows = [
        [names[m], str(best[m][1]), f"{best[m][0]:.1f}",
         common.format_number(best[m][1] / best[m][0]),
         common.format_number(residues / best[m][0]),
         f"{base / best[m][0]:.2f}x"]
        for m in modes
    ]
    heading = (
        f"### Ray bulk embedding, {args.model} ({weights_note}), {len(records)} proteins, "
        f"{threads or 'default'} torch thread(s) per replica/actor, ray.init(num_cpus="
        f"{args.ray_cpus}); {common.device_description(common.resolve_device(args.device))}"
        + (f"; {args.note}" if args.note else "")
    )
    table = common.markdown_table(
        ["how", "proteins embedded", "seconds", "proteins/s", "input residues/s",
         f"vs {modes[0]}"], rows,
    )
    payload = {"args": vars(args), "results": {m: {"seconds": best[m][0], "proteins": best[m][1]}
                                               for m in modes}}
    common.emit([heading, "", table], payload, args.json)


def _serves_max_length() -> bool:
    import dataclasses

    from esmc_server.config import ServerConfig

    return "max_length" in {f.name for f in dataclasses.fields(ServerConfig)}


if __name__ == "__main__":
    main()
