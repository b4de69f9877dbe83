"""Talk to an ``esmc serve`` started from an image, from outside it, over loopback.

Used by ``deploy/container/check.sh``: waits for health SERVING, calls Info, Logits and the
gRPC health service, reads ``/metrics``, then starts a Generate stream, sends SIGTERM to the
server and checks the drain: health turns NOT_SERVING while calls are still answered, and the
stream that was in flight finishes. Prints one ``probe:`` line per check; exits non-zero on the
first failure. Needs only the client package (no torch).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
import urllib.request

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from esmc_client import ESMCClient
from esmc_client.types import GenerationConfig, LogitsConfig

SEQUENCE = "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQAPILSRVGDGTQDNLSGAEKAVQVKVKALPDAQ"


def log(line: str) -> None:
    print(f"probe: {line}", flush=True)


def health_status(stub, service: str = "") -> str:
    try:
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
    except grpc.RpcError as e:
        return f"error {e.code().name}"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def wait_serving(stub, pid: int, timeout_s: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            raise SystemExit("probe: FAIL the server exited before it was SERVING") from None
        if health_status(stub) == "SERVING":
            return time.monotonic() - start
        time.sleep(0.5)
    raise SystemExit(f"probe: FAIL not SERVING within {timeout_s:.0f} s")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--metrics-port", type=int, required=True)
    p.add_argument("--pid", type=int, required=True, help="the server's process (gets SIGTERM)")
    p.add_argument("--start-timeout-s", type=float, default=300)
    args = p.parse_args()
    target = f"127.0.0.1:{args.port}"
    channel = grpc.insecure_channel(target)
    health = health_pb2_grpc.HealthStub(channel)

    seconds = wait_serving(health, args.pid, args.start_timeout_s)
    log(f"health SERVING after {seconds:.1f} s")
    with ESMCClient(target) as client:
        info = client.info(timeout=10)
        log(f"Info: model={info.model_name} device={info.device} dtype={info.dtype}")
        out = client.logits(SEQUENCE[:64], LogitsConfig(sequence=True), timeout=30)
        logits = np.asarray(out.logits.sequence)
        assert logits.shape == (66, info.logits_width) and np.isfinite(logits).all(), logits.shape
        log(f"Logits: shape {logits.shape}, finite, argmax[1:6] {logits[1:6].argmax(-1).tolist()}")
        for service in ("", "esmc.v1.ESMC"):
            status = health_status(health, service)
            assert status == "SERVING", (service, status)
            log(f"health Check(service={service!r}): {status}")
        url = f"http://127.0.0.1:{args.metrics_port}/metrics"
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        line = next(
            (
                ln for ln in text.splitlines()
                if ln.startswith("esmc_requests_total{") and 'method="Logits"' in ln
            ),
            None,
        )
        assert line is not None and line.endswith(" 1.0"), line
        log(f"/metrics: {line}")

        # The drain: a stream in flight when SIGTERM comes finishes; health turns NOT_SERVING.
        result: dict = {}

        def generate() -> None:
            start = time.monotonic()
            try:
                protein = client.generate(
                    "MKT" + "_" * 60, GenerationConfig(num_steps=8), seed=0, timeout=170
                )
                result["sequence"] = protein.sequence
                result["seconds"] = time.monotonic() - start
            except Exception as e:  # reported below
                result["error"] = repr(e)

        thread = threading.Thread(target=generate)
        thread.start()
        time.sleep(1.0)
        os.kill(args.pid, signal.SIGTERM)
        log("SIGTERM sent with a Generate stream (8 steps, 60 masks) in flight")
        deadline = time.monotonic() + 10
        while (status := health_status(health)) == "SERVING" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert status == "NOT_SERVING", status
        log(f"health after SIGTERM: {status}")
        info = client.info(timeout=5)
        log(f"Info during the drain delay: answered (model={info.model_name})")
        thread.join(timeout=180)
        assert "sequence" in result, result
        assert len(result["sequence"]) == 63 and "_" not in result["sequence"], result
        log(
            f"the in-flight Generate finished in {result['seconds']:.1f} s: "
            f"{len(result['sequence'])} residues, no mask left"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
