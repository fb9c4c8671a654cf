"""TLS, mutual TLS and bearer tokens, with certificates made at test time (cryptography).

Nothing here is a real secret: a throw-away CA, server and client certificates are
generated per session in a temporary directory, and so is a second, foreign CA.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

import lossd
from lossd import LossClient
from lossd_server.app import LossdServer, create_server
from lossd_server.security import TokenStore, parse_tokens
from lossd_server.settings import Settings
from tests.conftest import metric_value, read_json_logs_until_serving, start_server

LOGITS = np.array([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]], dtype=np.float32)
LABELS = np.array([0, 2])
EXPECTED = -np.log(np.exp(LOGITS[np.arange(2), LABELS]) / np.exp(LOGITS).sum(axis=1))
SERVING = health_pb2.HealthCheckResponse.SERVING


# ---------------------------------------------------------------------------------------
# Certificates


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@dataclass
class CA:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @classmethod
    def make(cls, cn: str) -> CA:
        key = _key()
        now = dt.datetime.now(dt.timezone.utc)
        cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn))
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5))
                .not_valid_after(now + dt.timedelta(days=1))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(
                    digital_signature=True, key_cert_sign=True, crl_sign=True,
                    content_commitment=False, key_encipherment=False, data_encipherment=False,
                    key_agreement=False, encipher_only=False, decipher_only=False),
                    critical=True)
                .sign(key, hashes.SHA256()))
        return cls(key, cert)

    def issue(self, cn: str, *, server: bool) -> tuple[bytes, bytes]:
        """(certificate PEM, key PEM) for a server (localhost, 127.0.0.1) or a client."""
        key = _key()
        now = dt.datetime.now(dt.timezone.utc)
        builder = (x509.CertificateBuilder().subject_name(_name(cn))
                   .issuer_name(self.cert.subject).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - dt.timedelta(minutes=5))
                   .not_valid_after(now + dt.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None),
                                  critical=True)
                   .add_extension(x509.ExtendedKeyUsage(
                       [ExtendedKeyUsageOID.SERVER_AUTH if server
                        else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
        if server:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        return _pem_cert(cert), _pem_key(key)


@dataclass
class Pki:
    dir: Path
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    foreign_ca: Path
    foreign_client_cert: Path
    foreign_client_key: Path


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca, foreign = CA.make("lossd test CA"), CA.make("some other CA")
    server_cert, server_key = ca.issue("lossd server", server=True)
    client_cert, client_key = ca.issue("lossd client", server=False)
    f_cert, f_key = foreign.issue("intruder", server=False)
    return Pki(
        dir=d, ca=_write(d / "ca.pem", _pem_cert(ca.cert)),
        server_cert=_write(d / "server.pem", server_cert),
        server_key=_write(d / "server.key", server_key),
        client_cert=_write(d / "client.pem", client_cert),
        client_key=_write(d / "client.key", client_key),
        foreign_ca=_write(d / "foreign-ca.pem", _pem_cert(foreign.cert)),
        foreign_client_cert=_write(d / "intruder.pem", f_cert),
        foreign_client_key=_write(d / "intruder.key", f_key))


def _evaluates(client: LossClient) -> None:
    r = client.evaluate(LOGITS, LABELS)
    np.testing.assert_allclose(r.per_sample, EXPECTED, rtol=1e-6)


# ---------------------------------------------------------------------------------------
# TLS


@pytest.fixture(scope="module")
def tls_server(pki: Pki) -> Iterator[LossdServer]:
    srv = start_server(tls_cert=str(pki.server_cert), tls_key=str(pki.server_key),
                       health_port=0)
    yield srv
    srv.stop(0)


def test_tls_serves_a_client_that_trusts_the_ca(tls_server: LossdServer, pki: Pki) -> None:
    with LossClient(f"127.0.0.1:{tls_server.port}", root_certificates=str(pki.ca),
                    timeout=10) as client:
        _evaluates(client)
    # PEM bytes work too, and so does the name "localhost" (in the certificate).
    with LossClient(f"localhost:{tls_server.port}", root_certificates=pki.ca.read_bytes(),
                    timeout=10) as client:
        assert {x.name for x in client.losses()} >= {"cross_entropy"}


def test_client_reads_the_ca_from_the_environment(
        tls_server: LossdServer, pki: Pki, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOSSD_TLS_CA", str(pki.ca))
    with LossClient(f"127.0.0.1:{tls_server.port}", timeout=10) as client:
        _evaluates(client)


def test_plaintext_to_a_tls_port_fails(tls_server: LossdServer) -> None:
    with LossClient(f"127.0.0.1:{tls_server.port}", timeout=5, retry_attempts=1) as client, \
            pytest.raises(lossd.Unavailable):
        client.evaluate(LOGITS, LABELS)


def test_a_client_that_does_not_trust_the_server_fails(tls_server: LossdServer,
                                                       pki: Pki) -> None:
    with LossClient(f"127.0.0.1:{tls_server.port}", root_certificates=str(pki.foreign_ca),
                    timeout=5, retry_attempts=1) as client, pytest.raises(lossd.Unavailable):
        client.evaluate(LOGITS, LABELS)


def test_the_plaintext_health_port_serves_probes_only(tls_server: LossdServer) -> None:
    assert tls_server.health_port
    with grpc.insecure_channel(f"127.0.0.1:{tls_server.health_port}") as ch:
        resp = health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service="lossd.v1.LossService"), timeout=5)
        assert resp.status == SERVING
    with LossClient(f"127.0.0.1:{tls_server.health_port}", timeout=5) as client, \
            pytest.raises(lossd.Unimplemented):
        client.evaluate(LOGITS, LABELS)


# ---------------------------------------------------------------------------------------
# Mutual TLS


@pytest.fixture(scope="module")
def mtls_server(pki: Pki) -> Iterator[LossdServer]:
    srv = start_server(tls_cert=str(pki.server_cert), tls_key=str(pki.server_key),
                       tls_client_ca=str(pki.ca))
    yield srv
    srv.stop(0)


def test_mtls_serves_a_client_with_a_certificate_from_the_ca(mtls_server: LossdServer,
                                                              pki: Pki) -> None:
    with LossClient(f"127.0.0.1:{mtls_server.port}", root_certificates=str(pki.ca),
                    certificate_chain=str(pki.client_cert), private_key=str(pki.client_key),
                    timeout=10) as client:
        _evaluates(client)


def test_mtls_client_certificate_from_the_environment(
        mtls_server: LossdServer, pki: Pki, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOSSD_TLS_CA", str(pki.ca))
    monkeypatch.setenv("LOSSD_TLS_CLIENT_CERT", str(pki.client_cert))
    monkeypatch.setenv("LOSSD_TLS_CLIENT_KEY", str(pki.client_key))
    with LossClient(f"127.0.0.1:{mtls_server.port}", timeout=10) as client:
        _evaluates(client)


def test_mtls_rejects_a_client_without_a_certificate(mtls_server: LossdServer,
                                                     pki: Pki) -> None:
    with LossClient(f"127.0.0.1:{mtls_server.port}", root_certificates=str(pki.ca),
                    timeout=5, retry_attempts=1) as client, pytest.raises(lossd.Unavailable):
        client.evaluate(LOGITS, LABELS)


def test_mtls_rejects_a_client_certificate_from_another_ca(mtls_server: LossdServer,
                                                           pki: Pki) -> None:
    with LossClient(f"127.0.0.1:{mtls_server.port}", root_certificates=str(pki.ca),
                    certificate_chain=str(pki.foreign_client_cert),
                    private_key=str(pki.foreign_client_key), timeout=5,
                    retry_attempts=1) as client, pytest.raises(lossd.Unavailable):
        client.evaluate(LOGITS, LABELS)


def test_tls_settings_are_checked(pki: Pki, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--tls-cert and --tls-key go together"):
        create_server(Settings(port=0, metrics_port=-1, device="cpu",
                               tls_cert=str(pki.server_cert)))
    with pytest.raises(ValueError, match="--tls-client-ca needs"):
        create_server(Settings(port=0, metrics_port=-1, device="cpu",
                               tls_client_ca=str(pki.ca)))
    with pytest.raises(ValueError, match="--tls-key: cannot read"):
        create_server(Settings(port=0, metrics_port=-1, device="cpu",
                               tls_cert=str(pki.server_cert), tls_key=str(tmp_path / "no")))
    with pytest.raises(ValueError, match="certificate_chain and private_key go together"):
        LossClient("127.0.0.1:1", certificate_chain=str(pki.client_cert), env={})


# ---------------------------------------------------------------------------------------
# Bearer tokens

TOKENS = ("tok-current-7f3a9c", "tok-next-b41e02")


@pytest.fixture(scope="module")
def token_server() -> Iterator[LossdServer]:
    mp = pytest.MonkeyPatch()
    mp.setenv("LOSSD_TEST_TOKENS", ", ".join(TOKENS))
    try:
        srv = start_server(auth_tokens_env="LOSSD_TEST_TOKENS", metrics_port=0)
    finally:
        mp.undo()
    yield srv
    srv.stop(0)


_metric = metric_value


def test_every_accepted_token_passes(token_server: LossdServer) -> None:
    for token in TOKENS:  # two at once: rotation
        with LossClient(f"127.0.0.1:{token_server.port}", token=token, timeout=10) as c:
            _evaluates(c)
            assert c.losses()


def test_a_missing_or_wrong_token_is_unauthenticated(token_server: LossdServer) -> None:
    assert token_server.metrics_port
    before = _metric(token_server.metrics_port, "lossd_rejected_requests_total",
                     method="Evaluate", reason="unauthenticated")
    for token in (None, "tok-current-7f3a9", "tok-current-7f3a9c0", "Bearer x"):
        with LossClient(f"127.0.0.1:{token_server.port}", token=token, timeout=10,
                        env={}) as client:
            with pytest.raises(lossd.Unauthenticated) as exc:
                client.evaluate(LOGITS, LABELS)
            assert exc.value.code == grpc.StatusCode.UNAUTHENTICATED
            assert "authorization" in exc.value.message
            assert "tok-" not in exc.value.message
    after = _metric(token_server.metrics_port, "lossd_rejected_requests_total",
                    method="Evaluate", reason="unauthenticated")
    assert after - before == 4
    # Refused before the message is read: the call named no loss yet.
    assert _metric(token_server.metrics_port, "lossd_requests_total", method="Evaluate",
                   loss="", code="UNAUTHENTICATED") >= 4


def test_a_malformed_authorization_header_is_unauthenticated(
        token_server: LossdServer) -> None:
    from lossd.v1 import loss_service_pb2 as pb
    from lossd.v1 import loss_service_pb2_grpc as pb_grpc

    with grpc.insecure_channel(f"127.0.0.1:{token_server.port}") as ch:
        stub = pb_grpc.LossServiceStub(ch)
        for md in ([("authorization", TOKENS[0])],  # no "Bearer "
                   [("authorization", f"Basic {TOKENS[0]}")],
                   [("authorization", f"Bearer {TOKENS[0]}"),
                    ("authorization", f"Bearer {TOKENS[0]}")]):
            with pytest.raises(grpc.RpcError) as exc:
                stub.ListLosses(pb.ListLossesRequest(), metadata=md, timeout=5)
            assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # Case-insensitive scheme, as HTTP has it.
        stub.ListLosses(pb.ListLossesRequest(), metadata=[("authorization",
                                                           f"bearer {TOKENS[1]}")], timeout=5)


def test_token_from_the_environment(token_server: LossdServer,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOSSD_TOKEN", TOKENS[1])
    with LossClient(f"127.0.0.1:{token_server.port}", timeout=10) as client:
        _evaluates(client)


def test_health_stays_open_without_a_token_and_reflection_does_not(
        token_server: LossdServer) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{token_server.port}") as ch:
        resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert resp.status == SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        req = reflection_pb2.ServerReflectionRequest(list_services="")
        with pytest.raises(grpc.RpcError) as exc:
            list(stub.ServerReflectionInfo(iter([req]), timeout=5))
        assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_token_file_rotates_without_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text("# lossd tokens\nold-token-1\n")
    srv = start_server(auth_tokens_file=str(path), auth_tokens_env="")
    try:
        address = f"127.0.0.1:{srv.port}"
        with LossClient(address, token="old-token-1", timeout=10) as old:
            _evaluates(old)
            path.write_text("old-token-1\nnew-token-2\n")  # both during the rollout
            time.sleep(1.1)
            with LossClient(address, token="new-token-2", timeout=10) as new:
                _evaluates(new)
                _evaluates(old)
                path.write_text("new-token-2\n# old-token-1 retired\n")
                time.sleep(1.1)
                _evaluates(new)
                with pytest.raises(lossd.Unauthenticated):
                    old.evaluate(LOGITS, LABELS)
                path.write_text("")  # a botched rotation keeps the last good tokens
                time.sleep(1.1)
                _evaluates(new)
    finally:
        srv.stop(0)


def test_token_store_rules(tmp_path: Path) -> None:
    assert parse_tokens(" a ,b\n\n# c\nd ") == ["a", "b", "d"]
    assert not TokenStore(env_name="NOPE", env={}).enabled
    with pytest.raises(ValueError, match="holds no token"):
        TokenStore(env_name="T", env={"T": " , "})
    empty = tmp_path / "empty"
    empty.write_text("# nothing\n")
    with pytest.raises(ValueError, match="holds no token"):
        TokenStore(file=str(empty), env={})
    with pytest.raises(ValueError, match="cannot read"):
        TokenStore(file=str(tmp_path / "missing"), env={})
    store = TokenStore(env_name="T", env={"T": "alpha,beta"})
    assert store.enabled and store.count == 2
    assert store.check_token("beta") and not store.check_token("gamma")
    assert store.check([("authorization", "Bearer alpha")]) is None
    assert store.check([]) is not None
    assert store.check([("authorization", b"Bearer alpha")]) is None


def test_settings_keep_no_secret_and_redact_key_paths() -> None:
    s = Settings(tls_key="/secrets/tls.key", auth_tokens_file="/secrets/tokens")
    logged = s.loggable()
    assert logged["tls_key"] == logged["auth_tokens_file"] == "<redacted>"
    assert logged["auth_tokens_env"] == "LOSSD_AUTH_TOKENS"  # a name, not a value
    assert "/secrets" not in json.dumps(logged)


# ---------------------------------------------------------------------------------------
# End to end: `lossd serve` with TLS, tokens and a metrics address of its own


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("processes", ["1", "2"])
def test_serve_with_tls_and_tokens_never_logs_or_exports_a_secret(pki: Pki, tmp_path: Path,
                                                                  processes: str) -> None:
    file_token, env_token, wrong = "file-token-5d1c7e", "env-token-a93b20", "wrong-token-77e1"
    tokens = tmp_path / "tokens"
    tokens.write_text(file_token + "\n")
    port, metrics_port, health_port = _free_port(), _free_port("127.0.0.2"), _free_port()
    env = {**os.environ, "LOSSD_AUTH_TOKENS": env_token, "LOSSD_LOG_FORMAT": "json",
           "LOSSD_LOG_LEVEL": "debug", "LOSSD_DEVICE": "cpu", "LOSSD_TOKEN": ""}
    cmd = [sys.executable, "-m", "lossd._cli", "serve", "--processes", processes,
           "--port", str(port),
           "--metrics-host", "127.0.0.2", "--metrics-port", str(metrics_port),
           "--health-port", str(health_port), "--tls-cert", str(pki.server_cert),
           "--tls-key", str(pki.server_key), "--tls-client-ca", str(pki.ca),
           "--auth-tokens-file", str(tokens), "--grace-seconds", "5"]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    try:
        lines = read_json_logs_until_serving(proc.stderr)
        serving = lines[-1]
        assert serving["tls"] == "mutual" and serving["auth_tokens"] == 2
        tls = {"root_certificates": str(pki.ca), "certificate_chain": str(pki.client_cert),
               "private_key": str(pki.client_key)}
        for token in (file_token, env_token):
            with LossClient(f"127.0.0.1:{port}", token=token, timeout=10, **tls) as c:
                _evaluates(c)
        with LossClient(f"127.0.0.1:{port}", token=wrong, timeout=10, **tls) as c, \
                pytest.raises(lossd.Unauthenticated):
            c.evaluate(LOGITS, LABELS)
        with grpc.insecure_channel(f"127.0.0.1:{health_port}") as ch:
            assert health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(), timeout=5).status == SERVING
        # The metrics endpoint listens on its own address only.
        with urllib.request.urlopen(f"http://127.0.0.2:{metrics_port}/metrics",
                                    timeout=10) as resp:
            exposition = resp.read().decode()
        assert "lossd_rejected_requests_total" in exposition
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5)
        proc.send_signal(signal.SIGTERM)
        rest = proc.stderr.read()
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log_text = json.dumps(lines) + rest
    for secret in (file_token, env_token, wrong, str(pki.server_key), str(tokens)):
        assert secret not in log_text, secret
        assert secret not in exposition, secret
    assert "refused" in rest and "lossd stopped" in rest
