"""Limits before work: requests bounded before they are parsed, unauthenticated calls refused
before their body is read, listeners that never share a port or run out of descriptors.

Each test is an attack on a real server (a subprocess on free ports, or an in-process server
on port 0); they assert refusals, codes, counts and memory bounds, never timings.
"""

from __future__ import annotations

import dataclasses
import socket
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers.inprocess import running_server, server_config
from helpers.models import seeded_model
from helpers.processes import ServeProcess

from esmc_proto.v1 import esmc_pb2 as pb
from esmc_proto.v1 import esmc_pb2_grpc as pb_grpc
from esmc_server.cli import build_parser
from esmc_server.config import ServerConfig, descriptor_limit

pytestmark = pytest.mark.e2e

TOKEN = "tok-limits-5e1d"
RSS_BOUND_MB = 300
BOMB_BYTES = 400 * 1024 * 1024  # a 0.4 MB gzip request inflating to 400 MB
LOGITS = "/esmc.v1.ESMC/Logits"


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no {field} for process {pid}")


def reset_peak_rss(pid: int) -> None:
    """From now on VmHWM (the peak RSS) counts from the current RSS (Linux clear_refs 5)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def logits_request_bytes(residues: int) -> bytes:
    """A serialized LogitsRequest whose protein has ``residues`` letters, built as bytes
    (protein = field 1, its sequence = field 1), so the client holds it only once."""
    sequence = b"A" * residues
    protein = b"\x0a" + _varint(len(sequence)) + sequence
    return b"\x0a" + _varint(len(protein)) + protein


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def send_raw(target: str, data: bytes, *, token: str | None, gzip: bool) -> grpc.RpcError:
    """Send ``data`` as a Logits request; returns the error the server answers with."""
    options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
    with grpc.insecure_channel(target, options=options) as channel:
        call = channel.unary_unary(
            LOGITS, request_serializer=lambda b: b, response_deserializer=pb.LogitsResponse.FromString
        )
        metadata = [("authorization", f"Bearer {token}")] if token else None
        compression = grpc.Compression.Gzip if gzip else None
        with pytest.raises(grpc.RpcError) as caught:
            call(data, timeout=120, metadata=metadata, compression=compression)
    return caught.value


@pytest.fixture(scope="module")
def tokens_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("limits") / "tokens"
    path.write_text(f"{TOKEN}\n")
    return path


@pytest.fixture(scope="module")
def authed(tokens_path):
    with ServeProcess("esmc-tiny", ["--auth-tokens-file", str(tokens_path), "--threads", "1"]) as served:
        yield served


def test_request_limit_is_its_own_small_and_follows_max_length():
    default = ServerConfig()
    assert default.request_limit == 256 * (16384 + 2)  # 4.0 MiB, not the response limit
    assert default.request_limit < default.max_message_bytes
    assert ServerConfig(max_length=1000).request_limit == 1 << 20  # at least 1 MiB
    assert ServerConfig(max_length=100_000).request_limit == 256 * 100_002
    assert ServerConfig(max_request_bytes=200_000).request_limit == 200_000
    with pytest.raises(ValueError, match="max_request_bytes must be >= 64 KiB"):
        ServerConfig(max_request_bytes=1000)


def test_unauthenticated_gzip_bomb_is_refused_unread(authed):
    """0.4 MB of gzip inflating to 400 MB, without a token: UNAUTHENTICATED, and the
    server's peak RSS stays within the bound (it never decompresses nor parses the body)."""
    pid = authed.process.pid
    before = rss_mb(pid)
    reset_peak_rss(pid)
    for _ in range(2):
        error = send_raw(authed.target, logits_request_bytes(BOMB_BYTES), token=None, gzip=True)
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED, error.details()
    time.sleep(0.5)
    peak = rss_mb(pid, "VmHWM")
    assert peak - before < RSS_BOUND_MB, (before, peak)
    assert authed.health() == health_pb2.HealthCheckResponse.SERVING


def test_authenticated_gzip_bomb_is_refused_at_the_request_limit(authed):
    """With a token the same bomb is refused by size (decompression stops at the request
    limit, before anything is parsed): RESOURCE_EXHAUSTED, RSS within the bound."""
    pid = authed.process.pid
    before = rss_mb(pid)
    reset_peak_rss(pid)
    error = send_raw(authed.target, logits_request_bytes(BOMB_BYTES), token=TOKEN, gzip=True)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
    peak = rss_mb(pid, "VmHWM")
    assert peak - before < RSS_BOUND_MB, (before, peak)


def test_plain_request_over_the_request_limit_is_refused(authed):
    limit = ServerConfig().request_limit
    error = send_raw(authed.target, logits_request_bytes(limit + 10), token=TOKEN, gzip=False)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert str(limit) in error.details()
    # a request under the limit is read and validated as usual (too long a protein here)
    error = send_raw(authed.target, logits_request_bytes(20_000), token=TOKEN, gzip=False)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_second_server_on_a_held_health_port_fails_at_start(authed, tmp_path):
    """No listener uses SO_REUSEPORT unless asked: the health port included."""
    holder = socket.socket()
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # as a gRPC listener would
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        second = ServeProcess("esmc-tiny", ["--health-port", str(port), "--threads", "1"])
        second.start()
        try:
            assert second.process.wait(120) == 1
        finally:
            second.kill()
        log = second.log_text()
        assert f"cannot bind the health port 127.0.0.1:{port}" in log
        assert "Traceback" not in log
    finally:
        holder.close()


def test_health_port_of_a_running_server_is_not_shared(tmp_path):
    with ServeProcess("esmc-tiny", ["--health-port", "0", "--threads", "1"]) as first:
        assert first.health() == health_pb2.HealthCheckResponse.SERVING
        port = _health_port_of(first)
        second = ServeProcess("esmc-tiny", ["--health-port", str(port), "--threads", "1"])
        second.start()
        try:
            assert second.process.wait(120) == 1
        finally:
            second.kill()
        assert "cannot bind the health port" in second.log_text()
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=10
            )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def _health_port_of(served: ServeProcess) -> int:
    for line in served.log_text().splitlines():
        if "health on port" in line:
            return int(line.rsplit("health on port", 1)[1].split()[0].strip(",)"))
    raise AssertionError("the server did not log its health port:\n" + served.log_text())


async def test_grpc_connections_are_capped_below_the_descriptor_limit():
    """gRPC's incoming-connection limit (max_connections per listener): connections past
    it are refused, calls on them fail UNAVAILABLE, the connections within it keep working."""
    model = seeded_model(d_model=64, n_heads=1, n_layers=2, seed=6)
    config = dataclasses.replace(server_config(), max_connections=2, metrics_port=None)
    assert ServerConfig().connection_limit == max(16, descriptor_limit() // 4)
    async with running_server(model, config) as running:
        target = f"127.0.0.1:{running.port}"
        options = [("grpc.use_local_subchannel_pool", 1)]  # one connection per channel
        channels = [grpc.aio.insecure_channel(target, options=options) for _ in range(3)]
        try:
            codes = []
            for channel in channels:
                try:
                    await pb_grpc.ESMCStub(channel).Info(pb.InfoRequest(), timeout=5)
                    codes.append("OK")
                except grpc.aio.AioRpcError as e:
                    codes.append(e.code().name)
            assert codes[:2] == ["OK", "OK"] and codes[2] == "UNAVAILABLE", codes
            await pb_grpc.ESMCStub(channels[0]).Info(pb.InfoRequest(), timeout=5)
        finally:
            for channel in channels:
                await channel.close()


@pytest.mark.unit
def test_every_serve_flag_shows_its_default():
    parser = build_parser()
    missing = [a.option_strings for a in parser._actions
               if a.dest != "help" and "default" not in (a.help or "")]
    assert missing == []
    text = parser.format_help()
    for flag in ("--max-request-bytes", "--max-connections", "--http-idle-timeout-s",
                 "--max-unread-response-bytes", "--max-stream-ids", "--so-reuseport"):
        assert flag in text
    assert "(default 67108864)" in " ".join(text.split())
