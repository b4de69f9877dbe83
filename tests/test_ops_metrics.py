"""The metrics the alerts read: health, engine fault, queue capacity, process, certificate expiry.

Certificate expiry is read from the PEM with the standard library (esmc_server.certs); it is
checked against ``cryptography``'s parse of certificates from ``trustme`` (UTCTime before 2050,
GeneralizedTime after), then on a live TLS ``esmc serve``'s /metrics.
"""

from __future__ import annotations

import datetime
import signal
import time

import grpc
import pytest
import trustme
from cryptography import x509

from esmc_server.certs import certificate_expiry
from esmc_server.metrics import CertificateExpiry, Metrics
from helpers.processes import ServeProcess

UTC = datetime.timezone.utc
EXPIRY = CertificateExpiry.NAME


def issue(ca: trustme.CA, not_after: datetime.datetime, path) -> float:
    cert = ca.issue_cert("esmc.test", not_after=not_after)
    path.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))  # leaf first
    return x509.load_pem_x509_certificate(cert.cert_chain_pems[0].bytes()).not_valid_after_utc


@pytest.mark.unit
@pytest.mark.parametrize("when", [
    datetime.datetime(2031, 5, 6, 7, 8, 9, tzinfo=UTC),  # UTCTime
    datetime.datetime(2051, 1, 2, 3, 4, 5, tzinfo=UTC),  # GeneralizedTime
])
def test_certificate_expiry_is_the_leafs_not_after(tmp_path, when):
    path = tmp_path / "chain.pem"
    expected = issue(trustme.CA(), when, path)
    assert expected == when
    assert certificate_expiry(path) == when.timestamp()


@pytest.mark.unit
def test_a_file_without_a_certificate_is_a_value_error_and_no_sample(tmp_path):
    path = tmp_path / "key.pem"
    path.write_text("-----BEGIN PRIVATE KEY-----\nMIIB\n-----END PRIVATE KEY-----\n")
    with pytest.raises(ValueError):
        certificate_expiry(path)
    metrics = Metrics()
    metrics.watch_certificate(str(path))
    assert metrics.registry.get_sample_value(EXPIRY) is None
    when = datetime.datetime(2030, 1, 1, tzinfo=UTC)
    issue(trustme.CA(), when, path)  # renewed in place: the next scrape reads it
    assert metrics.registry.get_sample_value(EXPIRY) == when.timestamp()


@pytest.mark.unit
def test_health_engine_and_queue_gauges():
    metrics = Metrics(queue_capacity=12)
    value = metrics.registry.get_sample_value
    assert value("esmc_queue_capacity") == 12
    assert value("esmc_health_serving") == 0 and value("esmc_engine_failed") == 0
    metrics.on_serving(True)
    assert value("esmc_health_serving") == 1
    metrics.on_engine_failed()
    metrics.on_serving(False)
    assert value("esmc_engine_failed") == 1 and value("esmc_health_serving") == 0
    assert value("process_resident_memory_bytes") > 0
    assert abs(value("process_start_time_seconds") - time.time()) < 24 * 3600


@pytest.mark.e2e
def test_a_live_tls_server_exports_its_certificate_expiry_and_its_health(tmp_path):
    ca = trustme.CA()
    when = datetime.datetime(2033, 3, 4, 5, 6, 7, tzinfo=UTC)
    cert = ca.issue_cert("127.0.0.1", not_after=when)
    (tmp_path / "server.pem").write_bytes(b"".join(b.bytes() for b in cert.cert_chain_pems))
    cert.private_key_pem.write_to_path(tmp_path / "server.key")
    credentials = grpc.ssl_channel_credentials(ca.cert_pem.bytes())
    options = ["--tls-cert", str(tmp_path / "server.pem"), "--tls-key", str(tmp_path / "server.key"),
               "--max-queue", "77", "--drain-delay-s", "60", "--grace-s", "0"]
    with ServeProcess("esmc-tiny", options, credentials=credentials) as server:
        samples = server.metrics()
        assert samples[(EXPIRY, ())] == when.timestamp()
        assert samples[("esmc_queue_capacity", ())] == 77
        assert samples[("esmc_health_serving", ())] == 1
        assert samples[("esmc_engine_failed", ())] == 0
        server.signal(signal.SIGTERM)  # draining: NOT_SERVING, metrics still answered
        deadline = time.monotonic() + 30
        while server.metrics()[("esmc_health_serving", ())] != 0:
            assert time.monotonic() < deadline, "esmc_health_serving stayed 1 after SIGTERM"
            time.sleep(0.2)
        server.kill()
