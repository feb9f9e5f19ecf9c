"""Encryption in transit: a gateway serving https and blockservers serving https/wss, with a
self-signed certificate every process trusts through SSL_CERT_FILE. Hidden states and grants
cross only TLS; a plain-HTTP client of a blockserver gets nothing."""

import datetime
import ipaddress
import ssl

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.e2e.swarm import Swarm


def self_signed(directory) -> tuple[str, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "corolla test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


def test_a_swarm_over_tls(tiny_dir, tmp_path, monkeypatch):
    cert, key = self_signed(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", cert)  # the children (and httpx here) trust it
    tls = ["--ssl-certfile", cert, "--ssl-keyfile", key]
    swarm = Swarm(str(tiny_dir("llama")), ["0:3", "3:6"], tmp_path, gateway_args=[*tls, "--swarm-secret", "s3"],
                  blockserver_args=[*tls, "--swarm-secret", "s3"], model_name="llama")
    swarm.url = swarm.url.replace("http://", "https://")
    try:
        swarm.start()
        trust = ssl.create_default_context(cafile=cert)
        servers = httpx.get(f"{swarm.url}/v1/swarm", verify=trust).json()["servers"]
        assert len(servers) == 2 and all(s["url"].startswith("https://") for s in servers)
        body = {"model": "llama", "prompt": [1, 40, 41], "max_tokens": 8, "temperature": 0}
        r = httpx.post(f"{swarm.url}/v1/completions", json=body, verify=trust, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8, r.text
        plain = servers[0]["url"].replace("https://", "http://")
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"{plain}/health", timeout=5)  # no cleartext listener
    finally:
        swarm.stop()
