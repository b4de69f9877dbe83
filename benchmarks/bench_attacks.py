"""Is the service still there for everyone while one caller attacks it? Worst ``Info`` latency
and the server's peak RSS rise under each attack on the limits (docs/limits.md).

    python -m benchmarks.bench_attacks [--model esmc-tiny] [--only NAME,...] [--out FILE]

Runs one ``esmc serve`` (``--threads 1``, token auth, the HTTP front, under a 1,024-descriptor
limit as in the attacks' report) and, for each attack, runs the attacker in a separate process
while this process calls ``Info`` (with a token) every ``--interval-ms`` and records how long
each call took. ``Info`` does no work: its latency is how long the server's event loop was
busy with something else (goal: at most 300 ms). The server's peak RSS (``VmHWM``, reset
before each attack) minus its RSS before the attack is the memory the attack cost (goal:
within 300 MB). Prints a markdown table (and writes it with ``--out``).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc

from benchmarks.common import free_ports, load_note, markdown_table, percentile_ms
from esmc_proto.v1 import esmc_pb2 as pb
from esmc_proto.v1 import esmc_pb2_grpc as pb_grpc

TOKEN = "bench-attacks-token"
LETTERS = "ACDEFGHIKLMNPQRSTVWY"
BOMB_BYTES = 400 * 1024 * 1024
UNLIMITED = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]


def _auth() -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {TOKEN}")]


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _code(call) -> str:
    try:
        call()
        return "OK"
    except grpc.RpcError as e:
        return e.code().name


# -- attacks: each runs in its own process and returns what the server answered ---------------


def gzip_bomb(target: str, http: str, token: bool) -> str:
    """A 0.4 MB gzip Logits request inflating to 400 MB, twice."""
    sequence = b"A" * BOMB_BYTES
    protein = b"\x0a" + _varint(len(sequence)) + sequence
    data = b"\x0a" + _varint(len(protein)) + protein
    del sequence
    with grpc.insecure_channel(target, options=UNLIMITED) as channel:
        call = channel.unary_unary("/esmc.v1.ESMC/Logits", request_serializer=lambda b: b)
        metadata = _auth() if token else None
        codes = [
            _code(lambda: call(data, timeout=120, metadata=metadata,
                               compression=grpc.Compression.Gzip))
            for _ in range(2)
        ]
    return ", ".join(codes)


def score_long_variant(target: str, http: str, copies: int = 3) -> str:
    """ScoreVariants of a 16,384-residue wild type with one variant substituting every residue,
    ``copies`` at once (wt-marginals: one forward each; the cost is the parsing)."""
    wild_type = "".join(LETTERS[(i * 7) % 20] for i in range(16384))
    variant = ":".join(
        f"{a}{i + 1}{'A' if a != 'A' else 'C'}" for i, a in enumerate(wild_type)
    )
    request = pb.ScoreVariantsRequest(
        wild_type=pb.ESMProtein(sequence=wild_type), variants=[variant], method=pb.WT_MARGINALS
    )
    with grpc.insecure_channel(target, options=UNLIMITED) as channel:
        stub = pb_grpc.ESMCStub(channel)
        futures = [stub.ScoreVariants.future(request, timeout=300, metadata=_auth())
                   for _ in range(copies)]
        codes = [_code(f.result) for f in futures]
    return ", ".join(sorted(set(codes)))


def http_post(http: str, path: str, body: bytes) -> str:
    request = urllib.request.Request(
        f"{http}/api/v1/{path}", data=body, method="POST",
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as reply:
            reply.read()
            return str(reply.status)
    except urllib.error.HTTPError as e:
        return str(e.code)
    except OSError as e:  # the server may close before reading a body it refused
        return f"closed ({type(e).__name__})"


def http_big_ids(target: str, http: str) -> str:
    """A 60 MB JSON id list to the HTTP front."""
    body = b'{"inputs": {"sequence": [' + b"5," * 30_000_000 + b"5]}}"
    return http_post(http, "logits", body)


def http_all_outputs(target: str, http: str) -> str:
    """HTTP logits of 16,384 residues with every output (a 318 MB JSON response before)."""
    body = json.dumps({
        "inputs": {"sequence": [0] + [5] * 16384 + [2]},
        "logits_config": {"sequence": True, "return_embeddings": True,
                          "return_hidden_states": True},
    }).encode()
    return http_post(http, "logits", body)


def http_malformed(target: str, http: str) -> str:
    """A 5,000-digit integer, model as a list, ith_hidden_layer 2**80, JSON nested 100,000
    deep."""
    bodies = [
        b'{"inputs": {"sequence": [' + b"7" * 5000 + b"]}}",
        b'{"model": ["x"], "inputs": {"sequence": [0, 5, 2]}}',
        json.dumps({"inputs": {"sequence": [0, 5, 2]}, "logits_config": {
            "return_hidden_states": True, "ith_hidden_layer": 2**80}}).encode(),
        b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    ]
    return ", ".join(sorted({http_post(http, "logits", body) for body in bodies}))


def unread_embed_streams(target: str, http: str, hold_s: float = 20.0) -> str:
    """Eight Embed streams of 2,000-residue unpooled requests, never read, for ``hold_s``."""
    sequence = LETTERS * 100
    channel = grpc.insecure_channel(target, options=UNLIMITED)
    stub = pb_grpc.ESMCStub(channel)

    def requests(s: int):
        for i in range(200):
            yield pb.EmbedRequest(id=f"{s}-{i}", protein=pb.ESMProtein(sequence=sequence),
                                  pooling=pb.POOLING_NONE)

    calls = [stub.Embed(requests(s), timeout=600, metadata=_auth()) for s in range(8)]
    time.sleep(hold_s)
    for call in calls:
        call.cancel()
    channel.close()
    return "held unread, then cancelled"


def embed_invalid_long_ids(target: str, http: str, count: int = 200_000) -> str:
    """One Embed stream of ``count`` cheap invalid requests with 1,000-character ids."""
    pad = "x" * 996
    codes: dict[str, int] = {}
    with grpc.insecure_channel(target, options=UNLIMITED) as channel:
        stub = pb_grpc.ESMCStub(channel)
        requests = (pb.EmbedRequest(id=f"{i:07d}{pad}", protein=pb.ESMProtein(sequence="M9"))
                    for i in range(count))
        for reply in stub.Embed(requests, timeout=600, metadata=_auth()):
            codes[reply.error.code] = codes.get(reply.error.code, 0) + 1
    return ", ".join(f"{n:,} {code}" for code, n in sorted(codes.items()))


def idle_http_connections(target: str, http: str, count: int = 1100, hold_s: float = 5.0) -> str:
    """``count`` idle TCP connections to the HTTP front, held ``hold_s``; then /health."""
    port = int(http.rsplit(":", 1)[1])
    held = []
    for _ in range(count):
        try:
            held.append(socket.create_connection(("127.0.0.1", port), timeout=10))
        except OSError:
            break
    time.sleep(hold_s)
    try:
        with urllib.request.urlopen(f"{http}/health", timeout=10) as reply:
            health = reply.status
    except urllib.error.HTTPError as e:
        health = e.code
    except OSError as e:
        health = type(e).__name__
    for sock in held:
        sock.close()
    return f"{len(held)} opened; /health {health} while held"


def cancelled_generates(target: str, http: str, streams: int = 50) -> str:
    """Fifty Generate streams cancelled by their caller after a few messages."""
    request = pb.GenerateRequest(protein=pb.ESMProtein(sequence="M" + "_" * 300),
                                 config=pb.GenerationConfig(num_steps=300))
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.ESMCStub(channel)
        calls = [stub.Generate(request, timeout=120, metadata=_auth()) for _ in range(streams)]
        for i, call in enumerate(calls):
            for _ in range(1 + i % 3):
                next(call)
            call.cancel()
    return f"{streams} cancelled"


ATTACKS = {
    "gzip bomb, no token (0.4 MB -> 400 MB) x2": (gzip_bomb, {"token": False}),
    "gzip bomb, with token x2": (gzip_bomb, {"token": True}),
    "ScoreVariants, one variant of 16,384 substitutions x3": (score_long_variant, {}),
    "HTTP 60 MB JSON id list": (http_big_ids, {}),
    "HTTP logits 16,384 residues, every output": (http_all_outputs, {}),
    "HTTP malformed bodies (4 kinds)": (http_malformed, {}),
    "8 unread Embed streams, 2,000 residues unpooled": (unread_embed_streams, {}),
    "Embed stream, 200,000 invalid requests, 1,000-char ids": (embed_invalid_long_ids, {}),
    "1,100 idle HTTP connections": (idle_http_connections, {}),
    "50 Generate streams cancelled mid-write": (cancelled_generates, {}),
}
SHORT = {name: re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") for name in ATTACKS}


def _run_attack(name: str, target: str, http: str, results) -> None:
    function, kwargs = ATTACKS[name]
    try:
        results.put(function(target, http, **kwargs))
    except Exception as e:  # the table says what went wrong
        detail = e.details() if isinstance(e, grpc.RpcError) else str(e)
        results.put(f"attack ended: {type(e).__name__} {' '.join(str(detail).split())}"[:160])


# -- the server and the measurement ----------------------------------------------------------


def _rss_mb(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _start_server(model: str, nofile: int, tokens: Path, log) -> tuple[subprocess.Popen, str, str]:
    port, metrics = free_ports(2)
    command = [
        "prlimit", f"--nofile={nofile}:{nofile}", sys.executable, "-m", "esmc_server.cli",
        "serve", "--model", model, "--host", "127.0.0.1", "--port", str(port), "--metrics-port",
        str(metrics), "--http-port", "0", "--threads", "1", "--auth-tokens-file", str(tokens),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        text = Path(log.name).read_text()
        match = re.search(r"Forge-compatible HTTP on port (\d+)", text)
        if match:
            return process, f"127.0.0.1:{port}", f"http://127.0.0.1:{match.group(1)}"
        if process.poll() is not None:
            raise RuntimeError(f"esmc serve exited:\n{text[-3000:]}")
        time.sleep(0.2)
    raise TimeoutError("esmc serve did not start")


def _server_pid(process: subprocess.Popen) -> int:
    """prlimit execs the server, so the child is the server itself."""
    return process.pid


def _probe(target: str, stop: threading.Event, interval_s: float, out: list[float]) -> None:
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.ESMCStub(channel)
        while not stop.is_set():
            start = time.perf_counter()
            try:
                stub.Info(pb.InfoRequest(), timeout=60, metadata=_auth())
            except grpc.RpcError:
                pass
            out.append(time.perf_counter() - start)
            stop.wait(interval_s)


def measure(name: str, target: str, http: str, pid: int, interval_s: float) -> dict:
    before = _rss_mb(pid, "VmRSS")
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    latencies: list[float] = []
    stop = threading.Event()
    probe = threading.Thread(target=_probe, args=(target, stop, interval_s, latencies))
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    attacker = context.Process(target=_run_attack, args=(name, target, http, results))
    started = time.perf_counter()
    probe.start()
    attacker.start()
    outcome = results.get(timeout=900)
    attacker.join(60)
    time.sleep(1.0)  # what the attack left behind (e.g. a loop still parsing)
    stop.set()
    probe.join()
    return {
        "attack": name,
        "outcome": outcome,
        "seconds": round(time.perf_counter() - started, 1),
        "info_calls": len(latencies),
        "info_p50_ms": percentile_ms(latencies, 50),
        "info_max_ms": 1000 * max(latencies),
        "rss_before_mb": before,
        "rss_peak_rise_mb": _rss_mb(pid, "VmHWM") - before,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="esmc-tiny")
    parser.add_argument("--nofile", type=int, default=1024, help="the server's descriptor limit")
    parser.add_argument("--interval-ms", type=float, default=50.0)
    parser.add_argument("--only", default="", help="comma-separated attack slugs (default all)")
    parser.add_argument("--note", default="", help="a line for the table's heading")
    parser.add_argument("--out", default=None, help="also write the markdown here")
    parser.add_argument("--server-log", default=None, help="keep the server's log here")
    args = parser.parse_args(argv)
    chosen = [n for n in ATTACKS if not args.only or SHORT[n] in args.only.split(",")]
    load = os.getloadavg()
    rows, payload = [], []
    with tempfile.TemporaryDirectory() as directory, tempfile.NamedTemporaryFile(
        prefix="esmc-bench-attacks-", suffix=".log"
    ) as log:
        tokens = Path(directory) / "tokens"
        tokens.write_text(f"bench:{TOKEN}\n")
        process, target, http = _start_server(args.model, args.nofile, tokens, log)
        try:
            pid = _server_pid(process)
            for name in chosen:
                result = measure(name, target, http, pid, args.interval_ms / 1000)
                payload.append(result)
                rows.append([
                    name, result["outcome"], f"{result['info_calls']:,}",
                    f"{result['info_p50_ms']:.1f}", f"{result['info_max_ms']:.0f}",
                    f"{result['rss_peak_rise_mb']:+.0f}",
                ])
                print(f"{name}: {result}", file=sys.stderr, flush=True)
            server_log = Path(log.name).read_text()
        finally:
            process.terminate()
            process.wait(60)
    if args.server_log:
        Path(args.server_log).write_text(server_log)
    error_lines = [line for line in server_log.splitlines() if " ERROR " in line]
    kinds: dict[str, int] = {}
    for line in error_lines:
        kind = re.sub(r"\d+", "N", line.split(" ERROR ", 1)[1])[:120]
        kinds[kind] = kinds.get(kind, 0) + 1
    errors = len(error_lines)
    lines = [
        f"# Attacks on the limits: worst Info latency and server RSS ({args.model})",
        "",
        f"`python -m benchmarks.bench_attacks {' '.join(argv or sys.argv[1:])}`".replace(" `", "`"),
        "",
        f"esmc serve --threads 1 under a {args.nofile}-descriptor limit, token auth, HTTP front; "
        f"Info every {args.interval_ms:g} ms from another process than the attacker's. "
        "Goal: worst Info <= 300 ms, peak RSS rise <= 300 MB.",
        load_note(load),
        *([args.note] if args.note else []),
        "",
        markdown_table(
            ["attack", "what the server answered", "Info calls", "Info p50 ms",
             "Info max ms", "peak RSS rise MB"],
            rows,
        ),
        "",
        f"Server log: {len(server_log.splitlines())} lines, {errors} at ERROR.",
        *(f"- {n} x `{kind}`" for kind, n in sorted(kinds.items(), key=lambda kv: -kv[1])[:5]),
    ]
    print("\n".join(lines))
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
        Path(args.out).with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
