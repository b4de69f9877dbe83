"""The Forge-compatible HTTP endpoint (issue 10) with the official, unchanged Forge client.

``ESMCForgeInferenceClient(model="esmc-tiny", url="http://127.0.0.1:P", token=...)`` talks to a
real server started with ``http_port=0``; its numbers are the gRPC side's. The Forge client is
blocking (httpx), so its calls run in a thread while the server runs on the test's loop.
"""

from __future__ import annotations

import asyncio
import dataclasses

import aiohttp
import numpy as np
import pytest
import torch

from esmc.tokenizer import encode
from esmc_client import ESMCClient, LogitsConfig
from esmc_server.cli import build_parser, config_from_args
from esmc_server.config import ServerConfig
from helpers.inprocess import running_server, server_config
from helpers.models import seeded_model

pytestmark = [pytest.mark.parity, pytest.mark.e2e]
pytest.importorskip("esm")
import esm.sdk  # noqa: E402,F401  (must come before esm.sdk.forge: circular import)
from esm.sdk import api as sdk  # noqa: E402
from esm.sdk.forge import ESMCForgeInferenceClient  # noqa: E402
from tenacity import RetryError  # noqa: E402

TOKEN = "forge-test-token"
SEQUENCE = "MKTAYIAKQRQISFVKSHFSRQ"


@pytest.fixture(scope="module")
def model():
    return seeded_model(d_model=64, n_heads=1, n_layers=3, seed=2)


def http_config(tmp_path, **batching) -> ServerConfig:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{TOKEN}\n")
    config = server_config(**batching)
    return dataclasses.replace(
        config, model="esmc-tiny", http_port=0, auth_tokens_file=str(tokens), warmup=False
    )


def forge(port: int, token: str = TOKEN, model: str = "esmc-tiny", **retry) -> ESMCForgeInferenceClient:
    return ESMCForgeInferenceClient(
        model=model, url=f"http://127.0.0.1:{port}", token=token, request_timeout=30, **retry
    )


async def test_forge_client_gets_the_grpc_numbers(model, tmp_path):
    async with running_server(model, http_config(tmp_path)) as running:
        http_port, grpc_port = running.server.http.port, running.port

        def run():
            client = forge(http_port)
            tensor = client.encode(sdk.ESMProtein(sequence=SEQUENCE))
            decoded = client.decode(tensor)
            full = client.logits(
                tensor,
                sdk.LogitsConfig(sequence=True, return_embeddings=True, return_hidden_states=True),
            )
            layer = client.logits(
                tensor, sdk.LogitsConfig(return_hidden_states=True, ith_hidden_layer=1)
            )
            embeddings_only = client.logits(tensor, sdk.LogitsConfig(return_embeddings=True))
            with ESMCClient(f"127.0.0.1:{grpc_port}", token=TOKEN) as grpc_client:
                want = grpc_client.logits(
                    SEQUENCE,
                    LogitsConfig(sequence=True, return_embeddings=True, return_hidden_states=True),
                )
            return tensor, decoded, full, layer, embeddings_only, want

        tensor, decoded, full, layer, embeddings_only, want = await asyncio.to_thread(run)
        async_client = forge(http_port)
        again = await async_client.async_logits(tensor, sdk.LogitsConfig(sequence=True))
        await async_client.aclose()
    assert isinstance(tensor, sdk.ESMProteinTensor)
    assert tensor.sequence.tolist() == encode(SEQUENCE).tolist()
    assert isinstance(decoded, sdk.ESMProtein) and decoded.sequence == SEQUENCE
    n = len(SEQUENCE) + 2
    assert full.logits.sequence.shape == (1, n, 64)  # the reference's batch dimension
    assert full.embeddings.shape == (1, n, 64)
    assert full.hidden_states.shape == (3, 1, n, 64)
    # JSON carries float32 values exactly: the same numbers as the gRPC side
    assert np.array_equal(full.logits.sequence[0].numpy(), want.logits.sequence)
    assert np.array_equal(full.embeddings[0].numpy(), want.embeddings)
    assert np.array_equal(full.hidden_states[:, 0].numpy(), want.hidden_states)
    assert np.array_equal(layer.hidden_states[0, 0].numpy(), want.hidden_states[1])
    assert layer.logits.sequence is None and layer.embeddings is None
    assert embeddings_only.logits.sequence is None and embeddings_only.hidden_states is None
    assert torch.equal(again.logits.sequence, full.logits.sequence)


async def test_bad_input_bad_token_and_unknown_model_codes(model, tmp_path):
    async with running_server(model, http_config(tmp_path)) as running:
        port = running.server.http.port

        def run():
            client = forge(port)
            protein_tensor = sdk.ESMProteinTensor(sequence=encode("MKV"))
            return {
                "bad_sequence": client.encode(sdk.ESMProtein(sequence="MK*")),
                "bad_tokens": client.decode(sdk.ESMProteinTensor(sequence=torch.tensor([5, 6]))),
                "bad_layer": client.logits(
                    protein_tensor, sdk.LogitsConfig(return_hidden_states=True, ith_hidden_layer=9)
                ),
                "bad_token": forge(port, token="wrong").encode(sdk.ESMProtein(sequence="MKV")),
                "other_model": forge(port, model="esmc-6b-2024-12").encode(
                    sdk.ESMProtein(sequence="MKV")
                ),
            }

        errors = await asyncio.to_thread(run)
        async with aiohttp.ClientSession() as session:
            url = f"http://127.0.0.1:{port}"
            headers = {"Authorization": f"Bearer {TOKEN}"}
            async with session.post(f"{url}/api/v1/encode", data="{", headers=headers) as r:
                not_json = (r.status, await r.json())
            async with session.post(f"{url}/api/v1/logits", json={"inputs": {}}) as r:
                no_token = r.status
            async with session.get(f"{url}/health") as r:  # probes need no token
                health = (r.status, await r.json())
            async with session.get(f"{url}/openapi.json") as r:
                openapi = (r.headers["Content-Type"], await r.json())
    codes = {name: (e.error_code if isinstance(e, sdk.ESMProteinError) else e) for name, e in errors.items()}
    assert codes == {
        "bad_sequence": 400,
        "bad_tokens": 400,
        "bad_layer": 400,
        "bad_token": 401,
        "other_model": 404,
    }
    assert "invalid character '*'" in errors["bad_sequence"].error_msg
    assert "Failure in encode" in errors["bad_sequence"].error_msg  # the Forge client's wording
    assert TOKEN not in errors["bad_token"].error_msg and "wrong" not in errors["bad_token"].error_msg
    assert not_json[0] == 400 and not_json[1]["code"] == "INVALID_ARGUMENT"
    assert no_token == 401
    assert health == (200, {"status": "SERVING"})
    content_type, document = openapi
    assert content_type == "application/json"
    assert {"/api/v1/encode", "/api/v1/decode", "/api/v1/logits", "/health"} <= set(document["paths"])
    assert "429" in document["paths"]["/api/v1/logits"]["post"]["responses"]


AUTH = (("authorization", f"Bearer {TOKEN}"),)


def forge_logits(port: int, **retry):
    client = forge(port, **retry)
    tensor = sdk.ESMProteinTensor(sequence=encode("MKTAYIAK"))
    return client.logits(tensor, sdk.LogitsConfig(sequence=True))


async def queued(engine, depth: int) -> None:
    while engine.stats.queue_depth < depth:
        await asyncio.sleep(0.01)


async def test_http_and_grpc_requests_share_a_forward(model, tmp_path):
    """A batch of two closes when it is full: one gRPC and one HTTP request fill it."""
    config = http_config(tmp_path, max_wait_ms=60_000, max_batch_size=2)
    async with running_server(model, config) as running:
        engine = running.engine
        forwards = engine.stats.forwards
        grpc_call = asyncio.ensure_future(
            running.stub.Logits(_logits_request(SEQUENCE), metadata=AUTH, timeout=30)
        )
        await queued(engine, 1)
        shared = await asyncio.to_thread(forge_logits, running.server.http.port)
        grpc_response = await grpc_call
        assert engine.stats.forwards == forwards + 1  # one forward for both fronts
    assert grpc_response.metadata.batch_size == 2
    assert shared.logits.sequence.shape == (1, 10, 64)


async def test_full_queue_answers_429_which_the_forge_client_retries(model, tmp_path, capsys):
    """Two requests wait for company (queue of 2, 60 s wait): the next is refused with 429,
    retried by the Forge client (zero waits here), then given up."""
    config = http_config(tmp_path, max_queue=2, max_wait_ms=60_000)
    async with running_server(model, config) as running:
        waiting = [
            asyncio.ensure_future(
                running.stub.Logits(_logits_request("MKV"), metadata=AUTH, timeout=30)
            )
            for _ in range(2)
        ]
        await queued(running.engine, 2)
        retry = dict(max_retry_attempts=2, min_retry_wait=0, max_retry_wait=0)
        with pytest.raises(RetryError) as refused:
            await asyncio.to_thread(forge_logits, running.server.http.port, **retry)
        for call in waiting:
            call.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)
    error = refused.value.last_attempt.result()
    assert isinstance(error, sdk.ESMProteinError) and error.error_code == 429
    assert "queue" in error.error_msg.lower()
    assert refused.value.last_attempt.attempt_number == 2  # retried once, as configured
    assert "Retrying" in capsys.readouterr().out  # the Forge client's own retry message


def _logits_request(sequence: str):
    from esmc_proto.v1 import esmc_pb2 as pb

    return pb.LogitsRequest(protein=pb.ESMProtein(sequence=sequence), config=pb.LogitsConfig(sequence=True))


def test_http_port_flag_and_environment(monkeypatch):
    monkeypatch.delenv("ESMC_HTTP_PORT", raising=False)
    assert config_from_args(build_parser().parse_args([])).http_port is None
    assert config_from_args(build_parser().parse_args(["--http-port", "8080"])).http_port == 8080
    monkeypatch.setenv("ESMC_HTTP_PORT", "0")
    assert config_from_args(build_parser().parse_args([])).http_port == 0
    assert config_from_args(build_parser().parse_args(["--http-port", "off"])).http_port is None
    with pytest.raises(ValueError, match="http_port"):
        ServerConfig(http_port=70000)
