"""The HTTP front under attack: bodies bounded and parsed off the event loop, malformed bodies
answered 400 (never 500), responses refused before work when their JSON would pass the
response limit, idle and slow connections closed, connections capped with health still
answering, and running out of descriptors logged once per interval.

Real servers: in-process on port 0, or ``esmc serve`` subprocesses under a small descriptor
limit. The tests assert codes, counts and closed connections, never timings.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import json
import socket
import threading

import aiohttp
import pytest
import urllib.request
from grpc_health.v1 import health_pb2
from helpers.inprocess import running_server, server_config
from helpers.models import seeded_model
from helpers.processes import ServeProcess

from esmc_server import http as http_front

pytestmark = pytest.mark.e2e

SEQUENCE = [0] + [5] * 20 + [2]


@pytest.fixture(scope="module")
def model():
    return seeded_model(d_model=64, n_heads=1, n_layers=3, seed=2)


def http_config(**settings):
    config = server_config(max_message_bytes=4 * 1024 * 1024)
    return dataclasses.replace(
        config, model="esmc-tiny", http_port=0, warmup=False, **settings
    )


async def post(port: int, path: str, data: bytes, headers=None) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"http://127.0.0.1:{port}/api/v1/{path}", data=data,
            headers={"Content-Type": "application/json", **(headers or {})},
        ) as response:
            return response.status, await response.json(content_type=None)


def logits_body(**fields) -> bytes:
    return json.dumps({"inputs": {"sequence": SEQUENCE}, **fields}).encode()


async def test_malformed_bodies_are_400_never_500(model):
    async with running_server(model, http_config()) as running:
        port = running.server.http.port
        nested = b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
        cases = {
            "5,000-digit integer": b'{"inputs": {"sequence": [' + b"7" * 5000 + b"]}}",
            "4,000-digit integer": b'{"inputs": {"sequence": [' + b"7" * 4000 + b"]}}",
            "model as a list": logits_body(model=["esmc-tiny"]),
            "model as an object": logits_body(model={"name": "esmc-tiny"}),
            "ith_hidden_layer 2**80": logits_body(
                logits_config={"return_hidden_states": True, "ith_hidden_layer": 2**80}
            ),
            "JSON nested 100,000 deep": nested,
            "not UTF-8": b'{"inputs": "\xff\xfe"}',
            "a list, not an object": b"[1, 2]",
            "too many ids": json.dumps({"inputs": {"sequence": [5] * 20_000}}).encode(),
        }
        for name, body in cases.items():
            status, payload = await post(port, "logits", body)
            assert status == 400, (name, status, payload)
            assert payload["code"] == "INVALID_ARGUMENT", (name, payload)
        samples = running.scrape()
        internal = [k for k, v in samples.items() if ("code", "INTERNAL") in k[1] and v > 0]
        assert internal == []
        await running.assert_serving()


async def test_body_over_the_request_limit_is_413_unread(model):
    async with running_server(model, http_config(max_request_bytes=64 * 1024)) as running:
        port = running.server.http.port
        big = json.dumps({"inputs": {"sequence": [5] * 40_000}}).encode()  # ~120 KB
        assert len(big) > 64 * 1024
        status, payload = await post(port, "logits", big)
        assert status == 413 and "request limit of 65536 bytes (max_request_bytes)" in payload[
            "detail"
        ]

        async def chunks():  # no Content-Length: the limit applies as it is read
            for start in range(0, len(big), 8192):
                yield big[start:start + 8192]

        status, payload = await post(port, "logits", chunks())
        assert status == 413, payload
        assert (await post(port, "logits", logits_body()))[0] == 200


async def test_logits_response_over_the_limit_is_refused_before_work(model):
    """The HTTP response limit is gRPC's (max_message_bytes): a JSON response that would
    pass it is refused with what to ask for instead, and nothing is computed."""
    async with running_server(model, http_config()) as running:
        port = running.server.http.port
        forwards = running.engine.stats.forwards
        ids = [0] + [5] * 8000 + [2]
        body = json.dumps(
            {"inputs": {"sequence": ids},
             "logits_config": {"sequence": True, "return_embeddings": True}}
        ).encode()
        status, payload = await post(port, "logits", body)
        assert status == 400, payload
        assert "message limit of 4194304 bytes" in payload["detail"]
        assert "return_mean_embedding" in payload["detail"]
        assert running.engine.stats.forwards == forwards
        small = json.dumps(
            {"inputs": {"sequence": ids}, "logits_config": {"return_mean_embedding": True}}
        ).encode()
        status, payload = await post(port, "logits", small)
        assert status == 200 and len(payload["mean_embedding"][0]) == 64


async def test_bodies_are_parsed_and_responses_built_off_the_event_loop(model, monkeypatch):
    """Where the work runs (not how long it takes): parsing and serialising happen on
    threads other than the event loop's."""
    threads: dict[str, set[str]] = {"parse": set(), "dump": set()}
    parse, dumps = http_front._parse_json, http_front._dumps

    def recording_parse(raw):
        threads["parse"].add(threading.current_thread().name)
        return parse(raw)

    def recording_dumps(payload):
        threads["dump"].add(threading.current_thread().name)
        return dumps(payload)

    monkeypatch.setattr(http_front, "_parse_json", recording_parse)
    monkeypatch.setattr(http_front, "_dumps", recording_dumps)
    async with running_server(model, http_config()) as running:
        status, payload = await post(
            running.server.http.port, "logits", logits_body(logits_config={"sequence": True})
        )
        assert status == 200 and len(payload["logits"]["sequence"][0]) == len(SEQUENCE)
    loop_thread = threading.current_thread().name
    assert threads["parse"] and loop_thread not in threads["parse"]
    assert threads["dump"] and loop_thread not in threads["dump"]


def _open(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    return sock


def _read_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


async def test_idle_and_slow_header_connections_are_closed(model):
    async with running_server(model, http_config(http_idle_timeout_s=1.0)) as running:
        port = running.server.http.port
        idle, slow = _open(port), _open(port)
        slow.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # headers never finished
        assert await asyncio.to_thread(_read_all, idle) == b""  # closed by the server
        assert await asyncio.to_thread(_read_all, slow) == b""
        idle.close()
        slow.close()


async def test_connections_over_the_cap_get_503_and_health_still_answers(model):
    async with running_server(model, http_config(max_connections=4)) as running:
        port = running.server.http.port
        held = [_open(port) for _ in range(4)]
        await asyncio.sleep(0.2)  # let the server accept them (counted, not timed)
        assert len(running.server.http.runner.server.connections) == 4
        over = _open(port)
        over.sendall(b"POST /api/v1/logits HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
        reply = await asyncio.to_thread(_read_all, over)
        assert reply.startswith(b"HTTP/1.1 503") and b"max_connections" in reply
        probe = _open(port)
        probe.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = await asyncio.to_thread(_read_all, probe)
        assert reply.startswith(b"HTTP/1.1 200") and b'"SERVING"' in reply
        for sock in (*held, over, probe):
            sock.close()


def _http_health(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as reply:
            return reply.status
    except OSError:
        return -1


def _http_port_of(served: ServeProcess) -> int:
    for line in served.log_text().splitlines():
        if "Forge-compatible HTTP on port" in line:
            return int(line.split("Forge-compatible HTTP on port")[1].split(",")[0].split()[0])
    raise AssertionError(served.log_text())


def _limited(options: list[str], nofile: int) -> ServeProcess:
    served = ServeProcess("esmc-tiny", ["--http-port", "0", "--threads", "1", *options])
    served.command = ["prlimit", f"--nofile={nofile}:{nofile}", *served.command]
    return served


def test_a_flood_of_idle_connections_leaves_health_answering():
    """1,100 idle connections against a 256-descriptor limit: the default cap (a quarter of
    the limit) keeps descriptors free, so both healths answer; refusals are logged once per
    interval, not once per connection."""
    with _limited([], 256) as served:
        port = _http_port_of(served)
        flood = []
        for _ in range(1100):
            try:
                flood.append(_open(port))
            except OSError:
                break
        try:
            assert _http_health(port) == 200
            assert served.health() == health_pb2.HealthCheckResponse.SERVING
        finally:
            for sock in flood:
                sock.close()
        log = served.log_text()
        assert log.count("HTTP connection limit of 64 reached") <= 3, log[-3000:]
        assert "Traceback" not in log


def test_running_out_of_descriptors_is_logged_once_per_interval():
    """With the cap set above the descriptor limit, descriptors do run out: the log says so
    once per interval (not a line per accept attempt) and the server serves again after."""
    with _limited(["--max-connections", "5000"], 256) as served:
        port = _http_port_of(served)
        flood = []
        for _ in range(600):
            try:
                flood.append(_open(port))
            except OSError:
                break
        try:
            for _ in range(30):  # accepting is retried each second while descriptors are out
                if "cannot accept connections" in served.log_text():
                    break
                threading.Event().wait(0.5)
        finally:
            for sock in flood:
                sock.close()
        for _ in range(60):
            if _http_health(port) == 200:
                break
            threading.Event().wait(0.5)
        assert _http_health(port) == 200
        assert served.health() == health_pb2.HealthCheckResponse.SERVING
        lines = [line for line in served.log_text().splitlines() if "cannot accept" in line]
        assert lines, served.log_text()[-3000:]
        stamps = [datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f") for line in lines]
        gaps = [(b - a).total_seconds() for a, b in zip(stamps, stamps[1:])]
        assert all(gap >= 9.9 for gap in gaps), lines  # one line per 10 s interval at most
        assert "Traceback" not in served.log_text()
