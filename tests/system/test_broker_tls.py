"""Broker TLS with a client certificate (mTLS), from the upstream's ``CLIENT_CERT_PATH`` / ``CLIENT_KEY_PATH`` /
``ROOT_CA_PATH`` (issue 11).

A CA, a server certificate (127.0.0.1, localhost) and a client certificate are generated here; a nats-server
runs with ``tls {cert_file, key_file, ca_file, verify: true}`` (a client without a certificate the CA signed is
refused). ``memphis-gateway serve --broker ... --control-plane`` with the three paths authenticates, produces
and consumes over REST and gRPC (memphis-py's session and the control plane's nats-py connection both use
TLS). Without the client certificate (the variables unset, or a certificate another CA signed) the gateway
cannot connect: it exits at start-up with a message that says why, never a traceback.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from memgw.v1 import auth_pb2, auth_pb2_grpc, consume_pb2, consume_pb2_grpc, produce_pb2, produce_pb2_grpc

from gateway.embedded.server import EmbeddedBroker
from tests.system.test_upstream_dropin import free_port, wait_up

ROOT_PASSWORD = "T3st-pw-7c1e9f"
JWT_SECRET = "tls-test-secret-" + "y" * 32
pytestmark = pytest.mark.timeout(120)


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write(path: Path, key: ec.EllipticCurvePrivateKey | None, cert: x509.Certificate) -> None:
    path.with_suffix(".crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is not None:
        path.with_suffix(".key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))


def make_pki(where: Path, name: str = "ca") -> dict[str, Path]:
    """A CA and, signed by it, a server certificate for 127.0.0.1/localhost and a client certificate."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = _key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"memgw test {name}")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    _write(where / name, ca_key, ca)
    out = {"ca": where / f"{name}.crt"}
    for leaf, usage, sans in (
        ("server", ExtendedKeyUsageOID.SERVER_AUTH,
         [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
        ("client", ExtendedKeyUsageOID.CLIENT_AUTH, [x509.DNSName("memphis-gateway")]),
    ):
        key = _key()
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name}-{leaf}")]))
                .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.SubjectAlternativeName(sans), critical=False)
                .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                .sign(ca_key, hashes.SHA256()))
        _write(where / f"{name}-{leaf}", key, cert)
        out[f"{leaf}_cert"], out[f"{leaf}_key"] = where / f"{name}-{leaf}.crt", where / f"{name}-{leaf}.key"
    return out


class TlsBroker(EmbeddedBroker):
    """The embedded broker's configuration plus ``tls {..., verify: true}``: a client needs a certificate
    the CA signed."""

    pki: dict[str, Path]

    def config(self) -> dict[str, Any]:
        conf = super().config()
        conf["tls"] = {"cert_file": str(self.pki["server_cert"]), "key_file": str(self.pki["server_key"]),
                       "ca_file": str(self.pki["ca"]), "verify": True, "timeout": 2}
        return conf


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
async def tls_broker(pki: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Any:
    broker = TlsBroker(data_dir=tmp_path_factory.mktemp("tls-broker"), port=0, root_password=ROOT_PASSWORD)
    broker.pki = pki
    await broker.start()
    try:
        yield broker
    finally:
        await broker.stop()


def gateway_env(http_port: int, grpc_port: int, **tls: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMPHIS_GATEWAY_")}
    env.update(HTTP_PORT=str(http_port), MEMPHIS_GATEWAY_GRPC_PORT=str(grpc_port), ROOT_USER="root",
               ROOT_PASSWORD=ROOT_PASSWORD, MEMPHIS_GATEWAY_JWT_SECRET=JWT_SECRET, **tls)
    return env


def serve(
    broker: EmbeddedBroker, env: dict[str, str], cwd: Path, *, control_plane: bool = True
) -> subprocess.Popen[str]:
    """``memphis-gateway serve --broker``: with --control-plane in front of a plain nats-server (the broker is met
    at start-up), without it as in front of Memphis (the broker is met at the first login)."""
    flags = ["--control-plane"] if control_plane else []
    return subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--broker", f"127.0.0.1:{broker.port}", *flags,
         "--broker-timeout-s", "3"], env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def stop(proc: subprocess.Popen[str]) -> str:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.stderr is not None
    text = proc.stderr.read()
    proc.stderr.close()
    return text


async def test_gateway_with_the_client_certificate_produces_and_consumes(
    tls_broker: TlsBroker, pki: dict[str, Path], tmp_path: Path
) -> None:
    http, grpc_port = free_port(), free_port()
    env = gateway_env(http, grpc_port, CLIENT_CERT_PATH=str(pki["client_cert"]), CLIENT_KEY_PATH=str(pki["client_key"]),
                      ROOT_CA_PATH=str(pki["ca"]))
    proc = serve(tls_broker, env, tmp_path)
    base = f"http://127.0.0.1:{http}"
    try:
        wait_up(base + "/monitoring/live", proc)
        status, body, _ = await http_request("POST", base + "/auth/authenticate",
                                             {"Content-Type": "application/json"},
                                             b'{"username": "root", "password": "%s"}' % ROOT_PASSWORD.encode())
        assert status == 200, body
        jwt = _json(body)["jwt"]
        auth = {"Authorization": f"Bearer {jwt}"}
        status, body, _ = await http_request("POST", base + "/stations/tls-orders/produce/single",
                                             {**auth, "Content-Type": "application/json", "X-Via": "rest"},
                                             b'{"id": 1}')
        assert status == 200, body
        async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            reply = await auth_pb2_grpc.AuthServiceStub(channel).Authenticate(
                auth_pb2.AuthenticateRequest(username="root", password=ROOT_PASSWORD))
            md = (("authorization", f"Bearer {reply.jwt}"),)
            await produce_pb2_grpc.ProduceServiceStub(channel).ProduceSingle(
                produce_pb2.ProduceSingleRequest(station="tls-orders",
                                                 body={"content_type": "text/plain", "data": b"via grpc"}),
                metadata=md)
            batch = await consume_pb2_grpc.ConsumeServiceStub(channel).ConsumeBatch(
                consume_pb2.ConsumeBatchRequest(station="tls-orders", consumer_name="g", consumer_group="grpc",
                                                batch_size=10, batch_max_wait_time_ms=500), metadata=md)
            assert [m.message for m in batch.messages] == [b'{"id": 1}', b"via grpc"]
        status, body, _ = await http_request(
            "POST", base + "/stations/tls-orders/consume/batch", {**auth, "Content-Type": "application/json"},
            b'{"consumer_name": "c1", "batch_size": 10, "batch_max_wait_time_ms": 500}')
        assert status == 200, body
        assert [m["message"] for m in _json(body)] == ['{"id": 1}', "via grpc"]
        status, body, _ = await http_request("GET", base + "/monitoring/status", {}, b"")
        assert status == 200, body
    finally:
        log = stop(proc)
    assert "broker: external NATS JetStream at nats://127.0.0.1" in log
    assert "Traceback" not in log


@pytest.mark.parametrize("case", ["no client certificate", "a certificate another CA signed"])
async def test_without_the_client_certificate_the_gateway_says_why_it_cannot_connect(
    case: str, tls_broker: TlsBroker, pki: dict[str, Path], tmp_path: Path
) -> None:
    tls: dict[str, str] = {}
    if case != "no client certificate":
        other = make_pki(tmp_path, "other")
        tls = {"CLIENT_CERT_PATH": str(other["client_cert"]), "CLIENT_KEY_PATH": str(other["client_key"]),
               "ROOT_CA_PATH": str(pki["ca"])}
    proc = serve(tls_broker, gateway_env(free_port(), free_port(), **tls), tmp_path)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass
    log = stop(proc)
    assert proc.returncode == 1, f"the gateway did not exit with 1 (it kept retrying?):\n{log}"
    assert "Traceback" not in log, log
    errors = [line for line in log.splitlines() if " ERROR " in line]
    assert len(errors) == 1, log
    assert "start-up failed: TLS handshake with the broker at nats://127.0.0.1" in errors[0], errors
    if case == "no client certificate":
        assert "no client certificate is configured: set CLIENT_CERT_PATH, CLIENT_KEY_PATH and ROOT_CA_PATH" \
            in errors[0], errors
    else:
        assert "is signed by a CA the broker trusts" in errors[0], errors
    assert ROOT_PASSWORD not in log


async def http_request(method: str, url: str, headers: dict[str, str], body: bytes) -> tuple[int, bytes, Any]:
    async with aiohttp.ClientSession() as session, session.request(method, url, headers=headers,
                                                                   data=body or None) as resp:
        return resp.status, await resp.read(), resp.headers


def _json(raw: bytes) -> Any:
    return json.loads(raw)


@pytest.mark.parametrize("case", ["no client certificate", "a certificate another CA signed"])
async def test_in_front_of_memphis_a_login_is_503_and_the_log_says_why(
    case: str, tls_broker: TlsBroker, pki: dict[str, Path], tmp_path: Path
) -> None:
    """Without --control-plane the broker is met at the first login (memphis-py): 503 to the caller (a server
    problem, no detail for an anonymous caller), the reason and what to set in the operator's log."""
    tls: dict[str, str] = {}
    if case != "no client certificate":
        other = make_pki(tmp_path, "other")
        tls = {"CLIENT_CERT_PATH": str(other["client_cert"]), "CLIENT_KEY_PATH": str(other["client_key"]),
               "ROOT_CA_PATH": str(pki["ca"])}
    http = free_port()
    proc = serve(tls_broker, gateway_env(http, free_port(), **tls), tmp_path, control_plane=False)
    try:
        wait_up(f"http://127.0.0.1:{http}/monitoring/live", proc)
        status, body, _ = await http_request("POST", f"http://127.0.0.1:{http}/auth/authenticate",
                                             {"Content-Type": "application/json"},
                                             b'{"username": "root", "password": "%s"}' % ROOT_PASSWORD.encode())
        assert status == 503 and b"TLS" not in body, body
    finally:
        log = stop(proc)
    warning = next(line for line in log.splitlines() if "broker unavailable: cannot connect to" in line)
    if case == "no client certificate":
        assert "set CLIENT_CERT_PATH, CLIENT_KEY_PATH and ROOT_CA_PATH" in warning, warning
    else:
        assert "CLIENT_CERT_PATH, --broker-tls-cert" in warning and "a CA the broker trusts" in warning, warning
    assert "Traceback" not in log and ROOT_PASSWORD not in log
