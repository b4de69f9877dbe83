"""``esmc serve``: run the gRPC server until SIGTERM or SIGINT, then stop gracefully.

Flags override the ``ESMC_*`` environment variables (read in :mod:`esmc_server.config`),
which override the defaults. ``python -m esmc_server.cli`` runs the same command.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import signal
import sys
from collections.abc import Sequence

from esmc.runtime import keep_freed_memory
from esmc_server import logs
from esmc_server.app import create_server
from esmc_server.config import DEVICES, DTYPES, BatchingConfig, ServerConfig

log = logging.getLogger("esmc_server")


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The ``serve`` options; pass a (sub)parser to add them to it."""
    p = parser or argparse.ArgumentParser(
        prog="esmc serve",
        description="Serve ESMC over gRPC. Every option can also come from ESMC_<NAME> "
        "(e.g. ESMC_MAX_BATCH_TOKENS, ESMC_PACKED=false, ESMC_METRICS_PORT=off); flags win.",
    )
    p.add_argument("--model", help="registry name (esmc-tiny), hub repo id or local weights path")
    p.add_argument("--host", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="gRPC port (0: any free port)")
    p.add_argument("--metrics-port", type=_port_or_off, help="Prometheus port, or 'off'")
    p.add_argument(
        "--http-port",
        type=_port_or_off,
        help="also serve the Forge-compatible HTTP API on this port (0: any free port; "
        "default off); same engine, tokens and TLS as gRPC",
    )
    p.add_argument("--max-batch-tokens", type=int, help="token budget per forward")
    p.add_argument("--max-batch-size", type=int, help="sequences per forward (1: no batching)")
    p.add_argument("--max-wait-ms", type=float, help="wait bound from the oldest waiting request")
    p.add_argument("--max-queue", type=int, help="waiting requests before RESOURCE_EXHAUSTED")
    p.add_argument("--device", help=f"{' | '.join(DEVICES)} | cuda:N")
    p.add_argument(
        "--dtype", choices=DTYPES,
        help="default: bfloat16 on CUDA, exact float32 on the CPU; auto: bfloat16 on CUDA and on "
        "CPUs with native bf16 (AVX-512 BF16, AMX, Arm BF16), else float32; int8: CPU only, "
        "int8 block projections (fast with AVX-512 VNNI or AMX), never chosen by auto",
    )
    p.add_argument(
        "--padded",
        action="store_const",
        const=True,
        help="length-sorted padded batches instead of packing",
    )
    p.add_argument(
        "--max-message-bytes",
        type=int,
        help="largest response, gRPC and HTTP alike (larger outputs are refused before any "
        "work, with what to ask for instead)",
    )
    p.add_argument("--grace-s", type=float, help="seconds calls in flight get to finish on SIGTERM")
    p.add_argument(
        "--compile", action="store_const", const=True,
        help="torch.compile the block stack, compiled and warmed up before serving (ESMC_COMPILE)",
    )
    p.add_argument("--no-warmup", action="store_const", const=True, help="skip the warm-up forward")
    p.add_argument(
        "--max-score-forwards",
        type=int,
        help="masked copies (sequence forwards) one ScoreVariants or PseudoLogLikelihood "
        "request may need (default 20000)",
    )
    p.add_argument(
        "--max-request-token-forwards",
        type=int,
        help="token-forwards (tokens x forwards) one request may cost; more is refused with "
        "INVALID_ARGUMENT (default 4194304: a 2,000-residue PseudoLogLikelihood fits)",
    )
    p.add_argument(
        "--max-caller-token-forwards",
        type=int,
        help="token-forwards one caller may have in flight; more is refused with "
        "RESOURCE_EXHAUSTED and retry pushback (default 8388608)",
    )
    p.add_argument(
        "--max-inflight-token-forwards",
        type=int,
        help="token-forwards the whole server may have in flight (default 33554432)",
    )
    p.add_argument(
        "--generation-window", type=int, help="steps a generation may run ahead of its reader"
    )
    p.add_argument(
        "--forward-timeout-s",
        type=_seconds_or_off,
        help="a forward running longer is a fatal fault (health NOT_SERVING, exit 1), or 'off'",
    )
    p.add_argument(
        "--fatal-exit-s", type=float, help="seconds from a fatal engine fault to exit status 1"
    )
    p.add_argument(
        "--max-length",
        type=int,
        help="residues per protein accepted (default 16384, as the hosted API; the model was "
        "trained on 2046)",
    )
    p.add_argument(
        "--threads",
        type=int,
        help="torch threads for the model (default: torch's choice, one per core); use 1 when "
        "clients or other servers share the cores",
    )
    p.add_argument(
        "--embed-window",
        type=int,
        help="Embed requests per stream computed but not yet written (default 64)",
    )
    p.add_argument(
        "--stream-idle-timeout-s",
        type=float,
        help="cancel a stream whose client has read nothing for this long (default 60)",
    )
    p.add_argument(
        "--drain-delay-s",
        type=float,
        help="on SIGTERM: seconds of NOT_SERVING while still answering, before refusing new "
        "calls (default 5)",
    )
    p.add_argument(
        "--so-reuseport",
        action="store_const",
        const=True,
        help="let other processes bind the same port (off: a taken port is an error)",
    )
    p.add_argument("--log-level", default="INFO", help="default INFO")
    p.add_argument(
        "--log-request-content",
        action="store_const",
        const=True,
        help="log unexpected exceptions with their messages, which may quote request content "
        "such as sequences (default off: type and traceback only)",
    )
    _add_shared_service_flags(p)
    _add_limit_flags(p)
    _annotate_defaults(p)
    return p


def _add_limit_flags(p: argparse.ArgumentParser) -> None:
    """Limits applied before any work (see docs/limits.md)."""
    g = p.add_argument_group("limits before work (docs/limits.md)")
    g.add_argument(
        "--max-request-bytes",
        type=int,
        help="largest request once decompressed, gRPC and HTTP bodies alike (default: 256 "
        "bytes per token of --max-length, at least 1 MiB: 4 MiB for 16384 residues)",
    )
    g.add_argument(
        "--max-connections",
        type=int,
        help="open connections per listener (default: a quarter of the file-descriptor limit)",
    )
    g.add_argument(
        "--http-idle-timeout-s",
        type=float,
        help="close an HTTP connection with no complete request headers for this long",
    )
    g.add_argument(
        "--http-body-timeout-s", type=float, help="an HTTP request body must arrive within this"
    )
    g.add_argument(
        "--max-unread-response-bytes",
        type=int,
        help="response bytes written but not yet read by clients, all streams and calls together",
    )
    g.add_argument(
        "--max-stream-ids",
        type=int,
        help="requests one Embed/PseudoLogLikelihoodStream stream may send (ids are remembered "
        "to keep them unique)",
    )


_FIELD_OF_FLAG = {"padded": "packed", "no_warmup": "warmup"}


def _annotate_defaults(p: argparse.ArgumentParser) -> None:
    """Append each setting's default to its help, read from the config dataclasses."""
    defaults = {f.name: f.default for f in dataclasses.fields(ServerConfig)}
    defaults.update({f.name: f.default for f in dataclasses.fields(BatchingConfig)})
    for action in p._actions:
        field = _FIELD_OF_FLAG.get(action.dest, action.dest)
        if field not in defaults or "default" in (action.help or ""):
            continue
        value = defaults[field]
        if field != action.dest:  # --padded, --no-warmup: the flag turns the setting off
            value = not value
        shown = "off" if value is None else str(value).lower() if isinstance(value, bool) else value
        action.help = f"{action.help} (default {shown})" if action.help else f"default {shown}"


def _add_shared_service_flags(p: argparse.ArgumentParser) -> None:
    """TLS, token auth, connection management (see esmc_server.security)."""
    g = p.add_argument_group("security and connections (SIGHUP re-reads tokens and TLS files)")
    g.add_argument("--tls-cert", help="PEM certificate chain: serve TLS (ESMC_TLS_CERT)")
    g.add_argument("--tls-key", help="PEM private key of --tls-cert (ESMC_TLS_KEY)")
    g.add_argument(
        "--tls-client-ca", help="PEM CA: clients must present a cert it signed (mutual TLS)"
    )
    g.add_argument(
        "--auth-tokens-file",
        help="one token per line: every esmc.v1 call needs 'authorization: Bearer <token>'",
    )
    g.add_argument(
        "--auth-reflection",
        action="store_const",
        const=True,
        help="server reflection needs a token too (health never does)",
    )
    g.add_argument(
        "--max-connection-age-s",
        type=_seconds_or_off,
        help="GOAWAY connections after this long so clients re-resolve (default 300; 'off')",
    )
    g.add_argument(
        "--max-connection-age-grace-s", type=float, help="calls in flight at GOAWAY (default 60)"
    )
    g.add_argument("--keepalive-time-s", type=float, help="ping idle connections (default 60)")
    g.add_argument(
        "--health-port",
        type=int,
        help="plaintext gRPC port serving only grpc.health.v1 (for probes that cannot do TLS)",
    )
    g.add_argument(
        "--otlp-endpoint",
        help="OpenTelemetry collector, e.g. http://otel-collector:4317: a span per RPC "
        "(needs the [otel] extra)",
    )
    g.add_argument(
        "--keepalive-timeout-s", type=float, help="close after an unanswered ping (default 20)"
    )


def _seconds_or_off(text: str) -> float | str:
    return "off" if text.lower() in ("off", "none") else float(text)


def _port_or_off(text: str) -> int | str:
    return "off" if text.lower() in ("off", "none") else int(text)


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    overrides = {
        "model": args.model,
        "host": args.host,
        "port": args.port,
        "max_batch_tokens": args.max_batch_tokens,
        "max_batch_size": args.max_batch_size,
        "max_wait_ms": args.max_wait_ms,
        "max_queue": args.max_queue,
        "device": args.device,
        "dtype": args.dtype,
        "packed": None if args.padded is None else not args.padded,
        "max_message_bytes": args.max_message_bytes,
        "grace_s": args.grace_s,
        "warmup": None if args.no_warmup is None else not args.no_warmup,
        "compile": args.compile,
        "tls_cert": args.tls_cert,
        "tls_key": args.tls_key,
        "tls_client_ca": args.tls_client_ca,
        "auth_tokens_file": args.auth_tokens_file,
        "auth_reflection": args.auth_reflection,
        "max_connection_age_grace_s": args.max_connection_age_grace_s,
        "keepalive_time_s": args.keepalive_time_s,
        "keepalive_timeout_s": args.keepalive_timeout_s,
        "health_port": args.health_port,
        "otlp_endpoint": args.otlp_endpoint,
        "max_score_forwards": args.max_score_forwards,
        "max_request_token_forwards": args.max_request_token_forwards,
        "max_caller_token_forwards": args.max_caller_token_forwards,
        "max_inflight_token_forwards": args.max_inflight_token_forwards,
        "generation_window": args.generation_window,
        "fatal_exit_s": args.fatal_exit_s,
        "max_length": args.max_length,
        "threads": args.threads,
        "embed_window": args.embed_window,
        "stream_idle_timeout_s": args.stream_idle_timeout_s,
        "drain_delay_s": args.drain_delay_s,
        "so_reuseport": args.so_reuseport,
        "max_request_bytes": args.max_request_bytes,
        "max_connections": args.max_connections,
        "http_idle_timeout_s": args.http_idle_timeout_s,
        "http_body_timeout_s": args.http_body_timeout_s,
        "max_unread_response_bytes": args.max_unread_response_bytes,
        "max_stream_ids": args.max_stream_ids,
    }
    if isinstance(args.max_connection_age_s, float):
        overrides["max_connection_age_s"] = args.max_connection_age_s
    if args.forward_timeout_s not in (None, "off"):
        overrides["forward_timeout_s"] = args.forward_timeout_s
    config = ServerConfig.from_env(**overrides)
    if args.forward_timeout_s == "off":
        config = dataclasses.replace(config, forward_timeout_s=None)
    if args.metrics_port is not None:  # "off" means None, which from_env reads as "not given"
        port = None if args.metrics_port == "off" else args.metrics_port
        config = dataclasses.replace(config, metrics_port=port)
    if args.http_port is not None:
        http_port = None if args.http_port == "off" else args.http_port
        config = dataclasses.replace(config, http_port=http_port)
    if args.max_connection_age_s == "off":
        config = dataclasses.replace(config, max_connection_age_s=None)
    return config


async def serve(config: ServerConfig) -> int:
    """Serve until SIGTERM/SIGINT; then NOT_SERVING, refuse new calls, finish those in flight.

    Returns the exit status: 0, or 1 after a fatal engine fault (health NOT_SERVING for
    ``fatal_exit_s`` first, so probes see it, then exit for the orchestrator to restart us).
    """
    loop = asyncio.get_running_loop()
    # A SIGHUP while the model loads (tokens or certificates changed after they were read)
    # is kept and applied once the server exists, never lost nor fatal.
    hangups: list[int] = []
    loop.add_signal_handler(signal.SIGHUP, hangups.append, 1)
    server, port = await create_server(config)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, server.security.reload)
    if hangups:
        server.security.reload()
    metrics = f", metrics on port {server.metrics_port}" if server.metrics_port is not None else ""
    if server.http is not None:
        metrics += f", Forge-compatible HTTP on port {server.http.port}"
    if server.health_port is not None:
        metrics += f", health on port {server.health_port}"
    log.info(
        "serving %s on %s:%d (%s)%s",
        config.model, config.host, port, server.security.describe(), metrics,
    )
    failed = asyncio.ensure_future(server.failed.wait())
    stopped = asyncio.ensure_future(stop.wait())
    await asyncio.wait([failed, stopped], return_when=asyncio.FIRST_COMPLETED)
    if server.fatal is not None:
        log.error("exiting with status 1 in %.1f s: the engine failed", config.fatal_exit_s)
        await asyncio.wait([stopped], timeout=config.fatal_exit_s)
        await asyncio.wait_for(server.stop(0.0), timeout=10.0)
        return 1
    failed.cancel()
    log.info(
        "shutting down: NOT_SERVING for %.1f s, then calls in flight get %.1f s",
        config.drain_delay_s,
        config.grace_s,
    )
    await server.stop(config.grace_s, drain_delay_s=config.drain_delay_s)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:
        argv = argv[1:]
    args = build_parser().parse_args(argv)
    logs.configure(args.log_level, request_content=bool(args.log_request_content))
    try:
        config = config_from_args(args)
    except ValueError as e:
        log.error("invalid settings: %s", e)
        return 2
    keep_freed_memory()
    try:
        status = asyncio.run(serve(config))
    except (ValueError, OSError) as e:  # weights not found or unusable, port taken, ...
        log.error("cannot serve %s: %s", config.model, e)
        return 1
    if status != 0:  # a fatal engine fault: a hung device thread must not delay the exit
        logging.shutdown()
        os._exit(status)
    return 0


if __name__ == "__main__":
    sys.exit(main())
