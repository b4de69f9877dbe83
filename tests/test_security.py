"""TLS, mutual TLS and token auth against real servers, with certificates made at test time.

In-process servers run on their own event-loop thread, so the blocking client, raw stubs
and the CLI talk to them over real channels; token rotation by SIGHUP uses an ``esmc serve``
subprocess. Certificates come from ``trustme`` (a throwaway CA per test module).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import signal
import ssl
import time
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
import torch
import trustme
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from esmc.config import ESMCConfig
from esmc import ESMC
from esmc_client import AsyncESMCClient, ESMCClient, ESMCError, GenerationConfig, LogitsConfig
from esmc_client.cli import main as cli_main
from esmc_client.security import probe_address
from esmc_server import auth
from esmc_server.config import ServerConfig
from helpers.inprocess import loop_thread, serving_on
from helpers.processes import ServeProcess

pytestmark = pytest.mark.e2e

TOKEN = "tok-3f1c2a9e-good"
OTHER_TOKEN = "tok-77b0-rotated-in"
WRONG_TOKEN = "tok-not-on-the-list-5551"
SERVING = health_pb2.HealthCheckResponse.SERVING


@pytest.fixture(scope="module")
def model() -> ESMC:
    torch.manual_seed(0)
    return ESMC(ESMCConfig(d_model=64, n_heads=1, n_layers=2)).eval()


@pytest.fixture(scope="module")
def loop():
    with loop_thread() as loop:
        yield loop


@dataclasses.dataclass
class Served:
    server: object

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def metrics_text(self) -> str:
        url = f"http://127.0.0.1:{self.server.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.read().decode()


@contextlib.contextmanager
def serving(loop, model: ESMC, **settings):
    with serving_on(loop, model, **settings) as server:
        yield Served(server)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA with a server certificate for 127.0.0.1/localhost and a client certificate, plus an
    unrelated CA with its own client certificate; every PEM written to files."""
    directory = tmp_path_factory.mktemp("pki")
    ca, other_ca = trustme.CA(), trustme.CA()
    files = {}

    def write(name: str, blob) -> str:
        path = directory / name
        blob.write_to_path(str(path))
        files[name] = str(path)
        return str(path)

    server_cert = ca.issue_cert("127.0.0.1", "localhost")
    client_cert = ca.issue_cert("client@esmc.test")
    other_client = other_ca.issue_cert("intruder@esmc.test")
    write("ca.pem", ca.cert_pem)
    write("other-ca.pem", other_ca.cert_pem)
    write("server.pem", server_cert.private_key_and_cert_chain_pem)
    write("server.key", server_cert.private_key_pem)
    write("client.pem", client_cert.cert_chain_pems[0])
    write("client.key", client_cert.private_key_pem)
    write("other-client.pem", other_client.cert_chain_pems[0])
    write("other-client.key", other_client.private_key_pem)
    return files


@pytest.fixture
def tokens_file(tmp_path):
    path = tmp_path / "tokens"
    path.write_text(f"# esmc tokens\n{TOKEN}\n\n  {OTHER_TOKEN}  \n")
    return path


def health_of(channel: grpc.Channel) -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status


def list_services(channel: grpc.Channel, metadata=None) -> list[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    replies = list(stub.ServerReflectionInfo(iter([request]), timeout=10, metadata=metadata))
    return sorted(s.name for s in replies[0].list_services_response.service)


# --- the token store ------------------------------------------------------------------------


@pytest.mark.unit
def test_token_store_reads_tokens_and_checks_bearer_values(tokens_file):
    store = auth.TokenStore(tokens_file)
    assert len(store) == 2
    assert store.allows(f"Bearer {TOKEN}") and store.allows(f"bearer {OTHER_TOKEN}")
    for value in (None, "", TOKEN, f"Bearer {WRONG_TOKEN}", f"Basic {TOKEN}", "Bearer ",
                  f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}"):
        assert not store.allows(value), value
    assert TOKEN not in repr(vars(store))  # only digests are kept


@pytest.mark.unit
def test_token_store_reload_keeps_old_tokens_on_a_bad_file(tokens_file):
    store = auth.TokenStore(tokens_file)
    tokens_file.write_text("# nothing left\n")
    with pytest.raises(ValueError, match="holds no token"):
        store.reload()
    assert store.allows(f"Bearer {TOKEN}")
    tokens_file.write_text(f"{WRONG_TOKEN}\n")
    assert store.reload() == 1
    assert store.allows(f"Bearer {WRONG_TOKEN}") and not store.allows(f"Bearer {TOKEN}")


@pytest.mark.unit
def test_only_health_and_reflection_can_be_open():
    assert not auth.needs_token("/grpc.health.v1.Health/Check", protect_reflection=True)
    reflect = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
    assert not auth.needs_token(reflect, protect_reflection=False)
    assert auth.needs_token(reflect, protect_reflection=True)
    for method in ("/esmc.v1.ESMC/Logits", "/esmc.v1.ESMC/Embed", "/other.Service/Call"):
        assert auth.needs_token(method, protect_reflection=False)


@pytest.mark.unit
def test_settings_come_from_the_environment_and_are_checked():
    config = ServerConfig.from_env(
        {"ESMC_AUTH_TOKENS_FILE": "/t", "ESMC_TLS_CERT": "/c", "ESMC_TLS_KEY": "/k",
         "ESMC_TLS_CLIENT_CA": "/ca", "ESMC_MAX_CONNECTION_AGE_S": "off"}
    )
    assert (config.auth_tokens_file, config.tls_cert, config.tls_key, config.tls_client_ca) == (
        "/t", "/c", "/k", "/ca")
    assert config.max_connection_age_s is None and config.tls
    with pytest.raises(ValueError, match="go together"):
        ServerConfig(tls_cert="/c")
    with pytest.raises(ValueError, match="needs tls_cert"):
        ServerConfig(tls_client_ca="/ca")


# --- token auth -----------------------------------------------------------------------------


def test_auth_matrix(loop, model, tokens_file, caplog):
    sequence = "MKTAYIAKQR"
    with serving(loop, model, auth_tokens_file=str(tokens_file)) as served:
        with ESMCClient(served.target, token=TOKEN) as client:
            good = client.logits(sequence, LogitsConfig(sequence=True), timeout=30)
            assert good.logits.sequence.shape == (12, 64)
            results = client.embed([sequence, "MKV"], timeout=30)  # the bidirectional stream
            assert all(r.ok for r in results)
            steps = list(client.generate_stream("MK__V", seed=1, timeout=30))  # server stream
            assert steps[-1].final
        with ESMCClient(served.target, token=OTHER_TOKEN) as client:
            np.testing.assert_array_equal(
                client.logits(sequence, LogitsConfig(sequence=True)).logits.sequence,
                good.logits.sequence,
            )
        for token in (None, WRONG_TOKEN):
            with ESMCClient(served.target, token=token) as client:
                for call in (
                    lambda: client.info(timeout=10),
                    lambda: client.logits(sequence, timeout=10),
                    lambda: list(client.generate_stream("MK__V", seed=1, timeout=10)),
                ):
                    with pytest.raises(ESMCError) as error:
                        call()
                    assert error.value.code == "UNAUTHENTICATED"
                    assert "Bearer <token>" in error.value.message
                    assert WRONG_TOKEN not in error.value.message
                results = client.embed([sequence], timeout=10)
                assert not results[0].ok and results[0].error.code == "UNAUTHENTICATED"
        with grpc.insecure_channel(served.target) as channel:  # no metadata at all
            assert health_of(channel) == SERVING  # probes need no token
            assert "esmc.v1.ESMC" in list_services(channel)  # reflection open by default
        metrics = served.metrics_text()
        assert 'code="UNAUTHENTICATED"' in metrics
    for secret in (TOKEN, OTHER_TOKEN, WRONG_TOKEN):
        assert secret not in metrics and secret not in caplog.text


def test_reflection_needs_a_token_with_auth_reflection(loop, model, tokens_file):
    with serving(loop, model, auth_tokens_file=str(tokens_file), auth_reflection=True) as served:
        with grpc.insecure_channel(served.target) as channel:
            with pytest.raises(grpc.RpcError) as error:
                list_services(channel)
            assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "esmc.v1.ESMC" in list_services(channel, (("authorization", f"Bearer {TOKEN}"),))
            assert health_of(channel) == SERVING


def test_token_over_plaintext_warns_once_at_start(loop, model, tokens_file, caplog):
    with caplog.at_level("WARNING", logger="esmc_server.security"):
        with serving(loop, model, auth_tokens_file=str(tokens_file)):
            pass
    warnings = [r for r in caplog.records if "plaintext" in r.getMessage()]
    assert len(warnings) == 1


def test_async_client_sends_the_token(loop, model, tokens_file):
    async def calls(target):
        async with AsyncESMCClient(target, token=TOKEN) as client:
            info = await client.info(timeout=10)
        async with AsyncESMCClient(target) as client:
            with pytest.raises(ESMCError) as error:
                await client.info(timeout=10)
        return info, error.value.code

    with serving(loop, model, auth_tokens_file=str(tokens_file)) as served:
        info, code = asyncio.run(calls(served.target))
    assert info.d_model == 64 and code == "UNAUTHENTICATED"


def test_cli_token_flag_and_environment(loop, model, tokens_file, monkeypatch, capsys):
    with serving(loop, model, auth_tokens_file=str(tokens_file)) as served:
        assert cli_main(["info", "--target", served.target, "--token", TOKEN, "--json"]) == 0
        assert '"d_model": 64' in capsys.readouterr().out
        assert cli_main(["info", "--target", served.target]) == 2  # a whole-run failure (issue 11)
        assert "UNAUTHENTICATED" in capsys.readouterr().err
        monkeypatch.setenv("ESMC_TOKEN", OTHER_TOKEN)
        assert cli_main(["info", "--target", served.target]) == 0


def test_tokens_rotate_on_sighup(tmp_path):
    """A real ``esmc serve``: swap the file, SIGHUP, the old token is refused, the new works."""
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{TOKEN}\n")
    with ServeProcess("esmc-tiny", ["--auth-tokens-file", str(tokens)]) as served:
        with ESMCClient(served.target, token=TOKEN) as old, ESMCClient(
            served.target, token=OTHER_TOKEN
        ) as new:
            assert old.info(timeout=30).model_name == "esmc-tiny"
            with pytest.raises(ESMCError, match="UNAUTHENTICATED"):
                new.info(timeout=30)
            tokens.write_text(f"{OTHER_TOKEN}\n")
            served.signal(signal.SIGHUP)
            deadline = time.monotonic() + 30
            while True:  # the handler runs on the server's loop, shortly after the signal
                try:
                    new.info(timeout=30)
                    break
                except ESMCError:
                    assert time.monotonic() < deadline, served.log_text()
                    time.sleep(0.1)
            with pytest.raises(ESMCError, match="UNAUTHENTICATED"):
                old.info(timeout=30)
            tokens.write_text("")  # an empty file is refused: the current tokens stay
            served.signal(signal.SIGHUP)
            time.sleep(0.5)
            assert new.info(timeout=30).model_name == "esmc-tiny"
            assert served.health() == SERVING
        log = served.log_text()
    assert "auth tokens reloaded" in log and "previous ones stay in force" in log
    assert "plaintext" in log  # the start-up warning
    assert TOKEN not in log and OTHER_TOKEN not in log


def test_connections_aged_out_do_not_fail_calls(loop, model):
    """GOAWAY every 0.3 s (max_connection_age): a long stream and unary calls all complete."""
    settings = dict(max_connection_age_s=0.3, max_connection_age_grace_s=30.0)
    with serving(loop, model, **settings) as served, ESMCClient(served.target) as client:
        t0 = time.monotonic()
        steps = []
        for step in client.generate_stream("M" + "_" * 40, GenerationConfig(num_steps=40), 1):
            steps.append(step)
            time.sleep(0.02)  # a slow reader: the stream outlives several connection ages
        calls = 0
        while time.monotonic() - t0 < 2.5:
            client.logits("MKTAYIAKQR", timeout=30)
            calls += 1
    assert steps[-1].final and [s.step for s in steps[:-1]] == list(range(1, 41)) and calls > 5


# --- TLS and mutual TLS ---------------------------------------------------------------------


def test_tls_matrix(loop, model, pki):
    sequence = "MKTAYIAKQR"
    with serving(loop, model, tls_cert=pki["server.pem"], tls_key=pki["server.key"]) as served:
        with ESMCClient(served.target, tls=True, root_certificates=pki["ca.pem"]) as client:
            out = client.logits(sequence, LogitsConfig(sequence=True), timeout=30)
            assert out.logits.sequence.shape == (12, 64)
        with open(pki["ca.pem"], "rb") as handle:  # PEM bytes work as well as paths
            with ESMCClient(served.target, root_certificates=handle.read()) as client:
                assert client.info(timeout=30).d_model == 64
        failures = {  # each says what to change, at once (a retry cannot help)
            "speaks TLS and this client connects in plaintext: pass tls=True": ESMCClient(
                served.target
            ),
            "has a certificate this client does not trust: ": ESMCClient(
                served.target, tls=True, root_certificates=pki["other-ca.pem"]
            ),
        }
        for hint, client in failures.items():
            with client, pytest.raises(ESMCError) as error:
                client.info(timeout=10)
            assert error.value.code == "UNAVAILABLE" and error.value.attempts == 1, hint
            assert f"the server at 127.0.0.1:{served.port} {hint}" in str(error.value)
        with ESMCClient(served.target, root_certificates=pki["ca.pem"]) as client:
            assert client.info(timeout=30).d_model == 64  # the failures left it healthy
        creds = grpc.ssl_channel_credentials(open(pki["ca.pem"], "rb").read())
        with grpc.secure_channel(served.target, creds) as channel:
            assert health_of(channel) == SERVING


def test_tls_client_at_a_plaintext_port_is_told_so_and_a_down_server_is_retried(
    loop, model, pki
):
    with serving(loop, model) as served:
        with ESMCClient(served.target, root_certificates=pki["ca.pem"]) as client:
            with pytest.raises(ESMCError) as error:
                client.info(timeout=10)
        assert error.value.code == "UNAVAILABLE" and error.value.attempts == 1
        assert "does not speak TLS (it is plaintext): connect without TLS" in str(error.value)
        port = served.port
    # nothing listens any more: an ordinary UNAVAILABLE, retried, with no TLS advice
    with ESMCClient(f"127.0.0.1:{port}", root_certificates=pki["ca.pem"]) as client:
        with pytest.raises(ESMCError) as error:
            client.info(timeout=10)
    assert error.value.code == "UNAVAILABLE" and error.value.attempts > 1
    assert "TLS" not in str(error.value)


async def _async_plaintext_info(target: str) -> ESMCError:
    async with AsyncESMCClient(target) as client:
        with pytest.raises(ESMCError) as error:
            await client.info(timeout=10)
    return error.value


def test_async_client_is_told_about_a_tls_port(loop, model, pki):
    with serving(loop, model, tls_cert=pki["server.pem"], tls_key=pki["server.key"]) as served:
        error = asyncio.run(_async_plaintext_info(served.target))
    assert error.attempts == 1 and "speaks TLS and this client connects in plaintext" in str(error)


def test_plaintext_health_port_beside_mutual_tls(loop, model, pki):
    """Kubernetes' gRPC probes cannot do TLS: --health-port serves health alone in plaintext."""
    settings = dict(tls_cert=pki["server.pem"], tls_key=pki["server.key"],
                    tls_client_ca=pki["ca.pem"], health_port=0)
    with serving(loop, model, **settings) as served:
        probe_target = f"127.0.0.1:{served.server.health_port}"
        with grpc.insecure_channel(probe_target) as channel:
            assert health_of(channel) == SERVING
            with pytest.raises(grpc.RpcError) as error:  # nothing else is served there
                grpc_info = channel.unary_unary("/esmc.v1.ESMC/Info")
                grpc_info(b"", timeout=10)
            assert error.value.code() == grpc.StatusCode.UNIMPLEMENTED
        asyncio.run_coroutine_threadsafe(served.server.stop(1), loop).result(30)
        with grpc.insecure_channel(probe_target) as channel, pytest.raises(grpc.RpcError):
            health_of(channel)  # gone with the server


def mtls_client(served: Served, pki: dict) -> ESMCClient:
    return ESMCClient(served.target, root_certificates=pki["ca.pem"],
                      client_certificate=pki["client.pem"], client_key=pki["client.key"])


def test_mutual_tls_matrix(loop, model, pki):
    settings = dict(
        tls_cert=pki["server.pem"], tls_key=pki["server.key"], tls_client_ca=pki["ca.pem"]
    )
    with serving(loop, model, **settings) as served:
        with mtls_client(served, pki) as client:
            assert client.info(timeout=30).d_model == 64
        failures = {
            "requires a client certificate (mutual TLS): pass client_certificate": ESMCClient(
                served.target, root_certificates=pki["ca.pem"]
            ),
            "refused this client's certificate": ESMCClient(
                served.target,
                root_certificates=pki["ca.pem"],
                client_certificate=pki["other-client.pem"],
                client_key=pki["other-client.key"],
            ),
            "speaks TLS and this client connects in plaintext": ESMCClient(served.target),
        }
        for hint, client in failures.items():
            with client, pytest.raises(ESMCError) as error:
                client.info(timeout=10)
            assert error.value.code == "UNAVAILABLE" and error.value.attempts == 1, hint
            assert hint in str(error.value)
        with mtls_client(served, pki) as client:
            assert client.info(timeout=30).d_model == 64


def test_tls_with_tokens_and_the_cli(loop, model, pki, tokens_file, capsys, caplog):
    with caplog.at_level("WARNING", logger="esmc_server.security"):
        with serving(
            loop, model, tls_cert=pki["server.pem"], tls_key=pki["server.key"],
            auth_tokens_file=str(tokens_file),
        ) as served:
            base = ["info", "--target", served.target, "--tls-ca", pki["ca.pem"]]
            assert cli_main([*base, "--token", TOKEN]) == 0
            assert "d_model: 64" in capsys.readouterr().out
            assert cli_main(base) == 2  # whole-run failures exit 2 (issue 11)
            assert "UNAUTHENTICATED" in capsys.readouterr().err
            assert cli_main(["info", "--target", served.target, "--token", TOKEN]) == 2
            err = capsys.readouterr().err  # plaintext to a TLS port: what to change
            assert "UNAVAILABLE" in err and "pass tls=True" in err and "--tls" in err
    assert not [r for r in caplog.records if "plaintext" in r.getMessage()]


def https_health(port: int, ca_file: str) -> int:
    context = ssl.create_default_context(cafile=ca_file)
    url = f"https://127.0.0.1:{port}/health"
    with urllib.request.urlopen(url, context=context, timeout=10) as response:
        return response.status


def test_tls_files_reload_for_grpc_and_http(loop, model, tmp_path, caplog):
    """SIGHUP's reload (``Security.reload``) swaps the certificate on both TLS listeners:
    the next handshake uses the new files; a reload from broken files keeps the old ones."""
    old_ca, new_ca = trustme.CA(), trustme.CA()
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    old_ca_file, new_ca_file = str(tmp_path / "old-ca.pem"), str(tmp_path / "new-ca.pem")
    old_ca.cert_pem.write_to_path(old_ca_file)
    new_ca.cert_pem.write_to_path(new_ca_file)

    def install(ca: trustme.CA) -> None:
        issued = ca.issue_cert("127.0.0.1", "localhost")
        issued.private_key_and_cert_chain_pem.write_to_path(str(cert))
        issued.private_key_pem.write_to_path(str(key))

    def grpc_works(ca_file: str) -> bool:
        with ESMCClient(served.target, root_certificates=ca_file) as client:
            try:
                return client.info(timeout=10).d_model == 64
            except ESMCError as error:
                assert error.code == "UNAVAILABLE"
                return False

    def http_works(ca_file: str) -> bool:
        try:
            return https_health(served.server.http.port, ca_file) == 200
        except urllib.error.URLError as error:
            assert isinstance(error.reason, ssl.SSLCertVerificationError), error
            return False

    install(old_ca)
    settings = dict(tls_cert=str(cert), tls_key=str(key), http_port=0)
    with serving(loop, model, **settings) as served:
        assert grpc_works(old_ca_file) and http_works(old_ca_file)
        assert not grpc_works(new_ca_file) and not http_works(new_ca_file)
        install(new_ca)  # rotated on disk: nothing changes until the reload
        assert grpc_works(old_ca_file) and http_works(old_ca_file)
        served.server.security.reload()
        assert grpc_works(new_ca_file) and http_works(new_ca_file)
        assert not grpc_works(old_ca_file) and not http_works(old_ca_file)
        key.write_text("not a key\n")  # a broken rotation: logged, the new ones stay
        with caplog.at_level("ERROR", logger="esmc_server.security"):
            served.server.security.reload()
        assert "TLS files not reloaded" in caplog.text
        assert grpc_works(new_ca_file) and http_works(new_ca_file)


@pytest.mark.unit
def test_the_transport_probe_reads_the_first_address_of_a_target():
    assert probe_address("127.0.0.1:50051") == ("127.0.0.1", 50051)
    assert probe_address("dns:///esmc.internal:50051") == ("esmc.internal", 50051)
    assert probe_address("ipv4:10.0.0.1:7001,10.0.0.2:7002") == ("10.0.0.1", 7001)
    assert probe_address("ipv6:[::1]:5000") == ("::1", 5000)
    assert probe_address("[::1]:5000") == ("::1", 5000)
    for unnamed in ("unix:/tmp/esmc.sock", "esmc.internal", "xds:///esmc", "host:port"):
        assert probe_address(unnamed) is None, unnamed


@pytest.mark.unit
def test_client_tls_arguments_are_checked(pki):
    with pytest.raises(ValueError, match="go together"):
        ESMCClient("127.0.0.1:1", tls=True, client_certificate=pki["client.pem"])
    with pytest.raises(ValueError, match="tls=False"):
        ESMCClient("127.0.0.1:1", tls=False, root_certificates=pki["ca.pem"])
    with pytest.raises(ValueError, match="cannot read"):
        ESMCClient("127.0.0.1:1", root_certificates="/nonexistent/ca.pem")
    with pytest.raises(ValueError, match="whitespace"):
        ESMCClient("127.0.0.1:1", token="two words")


def test_bad_tls_files_fail_at_start(loop, model, tmp_path, pki):
    not_pem = tmp_path / "cert.pem"
    not_pem.write_text("hello")
    with pytest.raises(ValueError, match="not a PEM"):
        with serving(loop, model, tls_cert=str(not_pem), tls_key=pki["server.key"]):
            pass
    with pytest.raises(ValueError, match="cannot read TLS file"):
        with serving(loop, model, tls_cert=str(tmp_path / "missing"), tls_key=pki["server.key"]):
            pass


async def test_client_pings_at_the_configured_interval_are_accepted():
    """The server's minimum ping interval really reaches gRPC core: a client pinging every
    second on an idle connection keeps it (with the core's 5-minute default the server
    answers GOAWAY too_many_pings after two pings and the channel falls back to IDLE)."""
    from grpc_health.v1.health import aio as health_aio

    from esmc_server.security import connection_options

    config = ServerConfig(min_client_ping_interval_s=0.5, keepalive_permit_without_calls=True)
    server = grpc.aio.server(options=connection_options(config))
    health_pb2_grpc.add_HealthServicer_to_server(health_aio.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    pinging = [
        ("grpc.keepalive_time_ms", 1000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=pinging) as channel:
            await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            await asyncio.sleep(5)  # four idle pings
            assert channel.get_state() == grpc.ChannelConnectivity.READY
    finally:
        await server.stop(0)
