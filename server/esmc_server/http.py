"""Forge-compatible HTTP endpoint: what the official ``ESMCForgeInferenceClient`` calls.

``esmc serve --http-port P`` serves, from the same process, event loop and engine as gRPC
(so HTTP and gRPC requests share batches):

- ``POST /api/v1/encode``  ``{"inputs": {"sequence": str}}`` -> ``{"outputs": {"sequence": [int]}}``
- ``POST /api/v1/decode``  ``{"inputs": {"sequence": [int]}}`` -> ``{"outputs": {"sequence": str}}``
- ``POST /api/v1/logits``  ``{"inputs": {"sequence": [int]}, "logits_config": {...}}`` ->
  ``{"logits": {"sequence": ...}, "embeddings": ..., "hidden_states": ..., "mean_embedding":
  ..., "mean_hidden_state": ...}``: plain JSON lists with a batch dimension of 1, as the
  reference ``ESMC.logits`` returns them (logits (1, L, 64), embeddings (1, L, d), hidden
  states (layers, 1, L, d)), ``null`` for what was not asked;
- ``GET /health`` (no token; 503 until the model serves, once stopping and after a fatal
  engine fault, as the gRPC health), ``GET /openapi.json``.

Requests carry ``Authorization: Bearer <token>`` when the server has tokens (the same store
and check as gRPC). Inputs go through the gRPC servicer's readers (:mod:`esmc_server.convert`),
so both fronts accept and refuse the same things with the same messages. Errors answer
``{"detail": message, "code": gRPC status name}`` with the status of
:data:`esmc_proto.status.HTTP_STATUS` (400, 401, 404, 429, 503, 504...); the Forge client
retries 429, 502 and 504. Responses are always ``application/json`` (the client also accepts
it when it asks for pickle).

Limits before work (docs/limits.md): a body over the request limit answers 413 unread, one
that does not arrive within ``http_body_timeout_s`` 408; bodies are parsed and responses
built off the event loop; a logits response is refused before any work (400, with what to ask
for instead) when its JSON would pass the response limit, the same one as gRPC's; every
malformed body is a 400 naming the field. Connections are capped (``max_connections``) and
closed when idle or slow to send headers (``http_idle_timeout_s``); see
:mod:`esmc_server.connections`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from esmc.config import OFFICIAL_NAMES
from esmc_proto.status import http_status
from esmc_proto.v1 import esmc_pb2 as pb
from esmc_server import convert
from esmc_server.calls import ANONYMOUS, Caller
from esmc_server.connections import CappedListener
from esmc_server.calls import CURRENT_CALLER, current_caller, logits_call
from esmc_server.errors import (
    InvalidRequest,
    ServiceError,
    Unauthenticated,
    Unavailable,
)

log = logging.getLogger(__name__)

JSON = "application/json"
API = "/api/v1"
JSON_BYTES_PER_FLOAT = 25
"""Upper bound on one float32 in the JSON response: ``repr`` of the double (up to 23
characters, e.g. ``-1.2345678901234567e-05``), a comma and a share of the brackets."""
_INT_RANGE = range(-(2**31), 2**31)
_LOGITS_FLAGS = ("sequence", "return_embeddings", "return_hidden_states")
_MEAN_FLAGS = ("return_mean_embedding", "return_mean_hidden_states")
_TRACK_FLAGS = ("structure", "secondary_structure", "sasa", "function", "residue_annotations")


class NotServed(ServiceError):
    """The request names a model this server does not serve."""

    code = "NOT_FOUND"


class BodyTooLarge(InvalidRequest):
    """A request body over the request limit (HTTP 413; gRPC would say RESOURCE_EXHAUSTED)."""

    http = 413


class BodyTooSlow(InvalidRequest):
    """A request body that did not arrive in time (HTTP 408)."""

    http = 408


class HttpFront:
    """The HTTP routes over a running :class:`esmc_server.app.Server`'s engine and tokens."""

    def __init__(self, server):
        self._server = server
        self.runner: web.AppRunner | None = None
        self.listener: asyncio.Server | None = None
        self.port: int | None = None

    def application(self) -> web.Application:
        app = web.Application(client_max_size=self._server.config.request_limit)
        app.add_routes(
            [
                web.post(f"{API}/encode", self._route("encode", self._encode)),
                web.post(f"{API}/decode", self._route("decode", self._decode)),
                web.post(f"{API}/logits", self._route("logits", self._logits)),
                web.get("/health", self._health),
                web.get("/openapi.json", self._openapi),
            ]
        )
        return app

    async def start(self, host: str, port: int) -> int:
        """Listen on ``host:port`` (0: a free port), HTTPS when the server has TLS; returns
        the bound port. On stop, requests in flight get the server's grace period."""
        config = self._server.config
        self.runner = web.AppRunner(
            self.application(),
            access_log=None,
            shutdown_timeout=config.grace_s,
            keepalive_timeout=config.http_idle_timeout_s,  # from the connection's start too
        )
        await self.runner.setup()
        factory = CappedListener(self.runner.server, config.connection_limit, self._health_now)
        self.listener = await asyncio.get_running_loop().create_server(
            factory, host, port, ssl=self._ssl_context(),
            reuse_port=True if config.so_reuseport else None,
        )
        self.port = self.listener.sockets[0].getsockname()[1]  # the bound port (0: a free one)
        return self.port

    def _ssl_context(self) -> ssl.SSLContext | None:
        """The gRPC port's TLS files (reloaded with them on SIGHUP), or None for plain HTTP."""
        tls = self._server.security.tls if self._server.security is not None else None
        return None if tls is None else tls.ssl_context()

    async def stop(self) -> None:
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    # -- plumbing ------------------------------------------------------------------------------

    def _route(self, name: str, handler: Callable[[dict], Awaitable[dict]]):
        """Auth, JSON body, the model name; errors as JSON with their HTTP status; metrics."""

        async def route(request: web.Request) -> web.Response:
            start = time.perf_counter()
            code = "OK"
            caller = ANONYMOUS
            try:
                caller = self._check_token(request)
                body = await self._json_body(request)
                self._check_model(body.get("model"))
                return await _json_response(await handler(body))
            except ServiceError as e:
                code = e.code
                status = getattr(e, "http", None) or http_status(e.code)
                return await _json_response({"detail": str(e), "code": e.code}, status)
            except asyncio.CancelledError:
                code = "CANCELLED"
                raise
            except Exception as e:
                code = "INTERNAL"
                log.exception("HTTP %s failed", name)
                message = f"internal error: {type(e).__name__}"
                return await _json_response({"detail": message, "code": code}, 500)
            finally:
                self._server.metrics.on_request(f"http_{name}", code, time.perf_counter() - start)
                self._server.metrics.on_caller_request(caller.name, code)

        return route

    def _check_token(self, request: web.Request) -> Caller:
        """The request's caller (the token's name); Unauthenticated without an accepted one."""
        tokens = self._server.security.tokens if self._server.security is not None else None
        if tokens is None:
            return ANONYMOUS
        caller = tokens.caller(request.headers.get("Authorization"))
        if caller is None:
            raise Unauthenticated(
                "missing or invalid token: send 'Authorization: Bearer <token>'"
            )
        CURRENT_CALLER.set(caller)  # the route's handler runs in this context
        return caller

    async def _json_body(self, request: web.Request) -> dict:
        """The body as a JSON object: its size checked before it is read, read within the
        body timeout, parsed off the event loop."""
        config = self._server.config
        limit = config.request_limit
        if request.content_length is not None and request.content_length > limit:
            raise _too_large(request.content_length, limit)
        try:
            async with asyncio.timeout(config.http_body_timeout_s):
                raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise _too_large(None, limit) from None
        except TimeoutError:
            raise BodyTooSlow(
                f"the body did not arrive within {config.http_body_timeout_s:g} s "
                "(http_body_timeout_s)"
            ) from None
        body = await asyncio.to_thread(_parse_json, raw)
        if not isinstance(body, dict):
            raise InvalidRequest("the body must be a JSON object")
        return body

    def _check_model(self, name: Any) -> None:
        served = self._server.config.model
        if name is not None and not isinstance(name, str):
            raise InvalidRequest(f"model must be a string, got {type(name).__name__}")
        if name is None or _canonical(name) == _canonical(served):
            return
        raise NotServed(f"model {name!r} is not served here; this server serves {served!r}")

    @property
    def _served(self):
        if self._server.engine is None or self._server.model is None:
            raise Unavailable("the server is not ready: the model is loading or shutting down")
        return self._server.engine, self._server.model

    # -- routes --------------------------------------------------------------------------------

    async def _encode(self, body: dict) -> dict:
        sequence = _field(_inputs(body), "sequence", str)
        limit = self._server.config.max_tokens
        tokens = convert.tokens_from_protein(pb.ESMProtein(sequence=sequence), limit)
        return {"outputs": {"sequence": tokens.tolist()}}

    async def _decode(self, body: dict) -> dict:
        ids = _token_ids(_inputs(body), self._server.config.max_tokens)
        limit = self._server.config.max_tokens
        tokens = convert.tokens_from_tensor(pb.ESMProteinTensor(sequence=ids), limit)
        return {"outputs": {"sequence": convert.protein_to_proto(tokens).sequence}}

    async def _logits(self, body: dict) -> dict:
        engine, model = self._served
        ids = _token_ids(_inputs(body), self._server.config.max_tokens)
        limit = self._server.config.max_tokens
        tokens = convert.tokens_from_tensor(pb.ESMProteinTensor(sequence=ids), limit)
        message = _logits_config_message(body.get("logits_config") or {})
        config, layers = convert.logits_config_from_proto(message, model.config.n_layers)
        shapes = convert.Shapes(d_model=model.config.d_model, logits_width=model.config.vocab_rows)
        size = _json_response_bytes(config, layers, len(tokens), shapes)
        convert.check_response_size(size, self._server.config.max_message_bytes, HTTP_SIZE_ADVICE)
        result = await engine.logits(logits_call(tokens, config, layers, caller=current_caller()))
        return await asyncio.to_thread(_logits_payload, result.output)

    async def _health(self, request: web.Request) -> web.Response:
        status, payload = self._health_now()
        return await _json_response(payload, status)

    def _health_now(self) -> tuple[int, dict]:
        """As the gRPC health: NOT_SERVING until the model serves, once stopping, and after a
        fatal engine fault. Also answered on connections over the cap."""
        server = self._server
        stopping = server._stopping is not None  # health turns NOT_SERVING first on stop
        serving = server.engine is not None and server.fatal is None and not stopping
        payload = {"status": "SERVING" if serving else "NOT_SERVING"}
        if server.fatal is not None:
            payload["reason"] = server.fatal
        return (200 if serving else 503), payload

    async def _openapi(self, request: web.Request) -> web.Response:
        return await _json_response(openapi_document())


def _canonical(name: str) -> str:
    return OFFICIAL_NAMES.get(name, name)


def _too_large(size: int | None, limit: int) -> BodyTooLarge:
    what = "the body" if size is None else f"the body of {size} bytes"
    return BodyTooLarge(
        f"{what} is over this server's request limit of {limit} bytes (max_request_bytes)"
    )


def _parse_json(raw: bytes) -> Any:
    """JSON from bytes (run in a thread); any malformed input is an InvalidRequest: bad
    syntax or encoding, an integer of more digits than Python converts, nesting too deep."""
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InvalidRequest(f"the body is not valid JSON: {e}") from None
    except RecursionError:
        raise InvalidRequest("the body is not valid JSON: nested too deeply") from None
    except ValueError as e:  # e.g. an integer over sys.get_int_max_str_digits() digits
        raise InvalidRequest(f"the body is not valid JSON: {e}") from None


def _inputs(body: dict) -> dict:
    inputs = body.get("inputs")
    if not isinstance(inputs, dict):
        raise InvalidRequest('"inputs" must be an object, e.g. {"sequence": ...}')
    return inputs


def _field(inputs: dict, name: str, kind: type) -> Any:
    value = inputs.get(name)
    if not isinstance(value, kind):
        raise InvalidRequest(f'inputs.{name} must be a {kind.__name__}, got {type(value).__name__}')
    return value


def _token_ids(inputs: dict, max_tokens: int) -> list[int]:
    """The ids, their count checked before any element is looked at."""
    ids = _field(inputs, "sequence", list)
    if len(ids) > max_tokens:
        raise InvalidRequest(
            f"inputs.sequence: token sequence has {len(ids)} ids; the limit is {max_tokens}"
        )
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise InvalidRequest("inputs.sequence must be a list of integer token ids")
    if not all(-(2**63) <= i < 2**63 for i in ids):
        raise InvalidRequest("inputs.sequence holds an id out of range")
    return ids


def _logits_config_message(fields: dict) -> pb.LogitsConfig:
    """The Forge ``logits_config`` as the gRPC message the servicer validates.

    ``ith_hidden_layer`` counts only when hidden states are asked for (the Forge client
    always sends it, -1 by default).
    """
    if not isinstance(fields, dict):
        raise InvalidRequest("logits_config must be an object")
    message = pb.LogitsConfig()
    for name in (*_LOGITS_FLAGS, *_MEAN_FLAGS, *_TRACK_FLAGS):
        value = fields.get(name, False)
        if not isinstance(value, bool):
            raise InvalidRequest(f"logits_config.{name} must be true or false")
        setattr(message, name, value)
    layer = fields.get("ith_hidden_layer", -1)
    if not isinstance(layer, int) or isinstance(layer, bool):
        raise InvalidRequest("logits_config.ith_hidden_layer must be an integer")
    if layer not in _INT_RANGE:
        raise InvalidRequest(f"logits_config.ith_hidden_layer {layer} is not a layer index")
    if layer != -1 and (message.return_hidden_states or message.return_mean_hidden_states):
        message.ith_hidden_layer = layer
    return message


def _logits_payload(output) -> dict:
    """Every key the Forge client reads, with the reference's batch dimension; null if absent."""

    def listed(tensor, batch_dim: int):
        return None if tensor is None else tensor.unsqueeze(batch_dim).tolist()

    sequence = output.logits.sequence if output.logits is not None else None
    return {
        "logits": {"sequence": listed(sequence, 0)},  # (1, L, 64)
        "embeddings": listed(output.embeddings, 0),  # (1, L, d)
        "hidden_states": listed(output.hidden_states, 1),  # (layers, 1, L, d)
        "mean_embedding": listed(output.mean_embedding, 0),  # (1, d)
        "mean_hidden_state": listed(output.mean_hidden_states, 1),  # (layers, 1, d)
    }


def _json_response_bytes(config, layers, tokens: int, shapes: convert.Shapes) -> int:
    """An upper bound on the JSON logits response's size, before any work."""
    floats = convert.logits_response_bytes(config, layers, tokens, shapes, pb.DTYPE_FLOAT32) // 4
    return 1024 + JSON_BYTES_PER_FLOAT * floats


HTTP_SIZE_ADVICE = (
    "ask for fewer outputs: one block with ith_hidden_layer, return_mean_embedding instead "
    "of per-residue embeddings, or the gRPC API (binary tensors, float16, the Embed stream)"
)


def _dumps(payload: dict) -> bytes:
    return json.dumps(payload, separators=(",", ":")).encode()


async def _json_response(payload: dict, status: int = 200) -> web.Response:
    """``Content-Type: application/json`` exactly (the Forge client compares the whole
    header value); serialised and encoded in a thread."""
    body = await asyncio.to_thread(_dumps, payload)
    return web.Response(body=body, status=status, headers={"Content-Type": JSON})


async def start_http(server, host: str, port: int) -> HttpFront:
    """Serve the HTTP routes of ``server`` on ``host:port``; ``front.port`` is the bound one."""
    front = HttpFront(server)
    await front.start(host, port)
    return front


# -- OpenAPI -----------------------------------------------------------------------------------

_ERROR = {
    "type": "object",
    "properties": {"detail": {"type": "string"}, "code": {"type": "string"}},
    "required": ["detail", "code"],
}
_IDS = {"type": "array", "items": {"type": "integer"}, "description": "<cls> ids... <eos>"}
_NESTED = {
    "type": "array",
    "nullable": True,
    "items": {},
    "description": "nested lists of float32 values",
}


def _post(summary: str, request: dict, response: dict) -> dict:
    errors = {
        "400": "invalid input",
        "401": "missing or invalid token",
        "408": "the body did not arrive in time",
        "413": "the body is over the request limit",
        "404": "model not served here",
        "429": "queue full: retry with backoff",
        "503": "not ready or shutting down",
        "504": "deadline exceeded",
    }
    responses = {"200": {"description": "OK", "content": {JSON: {"schema": response}}}}
    for status, text in errors.items():
        responses[status] = {"description": text, "content": {JSON: {"schema": _ERROR}}}
    return {
        "post": {
            "summary": summary,
            "security": [{"bearer": []}],
            "requestBody": {"required": True, "content": {JSON: {"schema": request}}},
            "responses": responses,
        }
    }


def _body(inputs: dict, **extra: dict) -> dict:
    return {
        "type": "object",
        "properties": {
            "model": {"type": "string"},
            "inputs": {"type": "object", "properties": {"sequence": inputs}, "required": ["sequence"]},
            "potential_sequence_of_concern": {"type": "boolean"},
            **extra,
        },
        "required": ["inputs"],
    }


def _outputs(sequence: dict) -> dict:
    return {"type": "object", "properties": {"outputs": {"type": "object", "properties": {"sequence": sequence}}}}


def openapi_document() -> dict:
    """The OpenAPI 3.0 description of the HTTP routes."""
    flags = {name: {"type": "boolean", "default": False} for name in (*_LOGITS_FLAGS, *_MEAN_FLAGS)}
    flags["ith_hidden_layer"] = {"type": "integer", "default": -1}
    logits_response = {
        "type": "object",
        "properties": {
            "logits": {"type": "object", "properties": {"sequence": _NESTED}},
            "embeddings": _NESTED,
            "hidden_states": _NESTED,
            "mean_embedding": _NESTED,
            "mean_hidden_state": _NESTED,
        },
        "required": ["logits", "embeddings", "hidden_states", "mean_embedding", "mean_hidden_state"],
    }
    return {
        "openapi": "3.0.3",
        "info": {"title": "esmc-serve (Forge-compatible)", "version": "1"},
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "paths": {
            f"{API}/encode": _post(
                "Sequence to token ids", _body({"type": "string"}), _outputs(_IDS)
            ),
            f"{API}/decode": _post("Token ids to sequence", _body(_IDS), _outputs({"type": "string"})),
            f"{API}/logits": _post(
                "Logits, embeddings and hidden states of one protein",
                _body(_IDS, logits_config={"type": "object", "properties": flags}),
                logits_response,
            ),
            "/health": {
                "get": {
                    "summary": "SERVING once the model is loaded (no token needed)",
                    "responses": {"200": {"description": "serving"}, "503": {"description": "not serving"}},
                }
            },
            "/openapi.json": {"get": {"summary": "This document", "responses": {"200": {"description": "OK"}}}},
        },
    }
