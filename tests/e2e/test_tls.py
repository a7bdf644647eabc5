"""`[broker] tls` (issue 15, item 6, listener side): the broker serves HTTPS with a certificate from a private CA,
reached by the official Python SDK client trusting that CA; plain HTTP and clients that do not trust the CA get no
MCP answer; SIGHUP reads a renewed certificate with no restart, and a broken renewal keeps the running one."""

from __future__ import annotations

import datetime
import ipaddress
import signal
import socket
import ssl
import time
from pathlib import Path

import httpx2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client

import helpers as H

pytestmark = pytest.mark.anyio


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_ca() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name("mcp-broker e2e CA")).issuer_name(_name("mcp-broker e2e CA"))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    return key, cert


def write_leaf(ca: tuple, cn: str, cert_path: Path, key_path: Path) -> None:
    ca_key, ca_cert = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM) + ca_cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))


def peer_cn(port: int, ctx: ssl.SSLContext) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            cert = tls.getpeercert()
    return dict(x[0] for x in cert["subject"])["commonName"]


async def test_https_listener_and_certificate_renewal(tmp_path):
    for b in (H.BROKER_BIN, H.LEDGER_BIN):
        if not b.exists():
            pytest.fail(f"{b} is missing (cargo build --all-targets)")
    ca = make_ca()
    ca_pem = tmp_path / "ca.pem"
    ca_pem.write_bytes(ca[1].public_bytes(serialization.Encoding.PEM))
    cert, key = tmp_path / "tls" / "cert.pem", tmp_path / "tls" / "key.pem"
    cert.parent.mkdir()
    write_leaf(ca, "first", cert, key)
    b = H.start_broker(tmp_path, {"ledger": H.example_stdio_spec(H.LEDGER_BIN)},
                       broker={"tls": {"cert": "tls/cert.pem", "key": "tls/key.pem"}}, name="broker-tls")
    try:
        assert b.url.startswith("https://"), b.url
        port = int(b.url.split(":")[2].split("/")[0])
        trust = ssl.create_default_context(cafile=str(ca_pem))
        # The official client, trusting the private CA.
        async with httpx2.AsyncClient(verify=trust, timeout=30) as hc:
            async with streamable_http_client(b.url, http_client=hc) as (read, write):
                async with ClientSession(read, write) as s:
                    await s.initialize()
                    tools = await s.list_tools()
                    assert any(t.name == "ledger__list_accounts" for t in tools.tools)
                    r = await s.call_tool("ledger__list_accounts", {})
                    assert not r.is_error, r
        # Without the CA: the handshake fails; plain HTTP: no HTTP answer.
        with pytest.raises(httpx2.ConnectError):
            httpx2.get(b.base + "/healthz", timeout=5)
        with pytest.raises(httpx2.HTTPError):
            httpx2.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
        assert httpx2.get(b.base + "/healthz", verify=trust, timeout=5).status_code == 200
        assert peer_cn(port, trust) == "first"
        # A renewed certificate is read on SIGHUP, with no restart.
        write_leaf(ca, "renewed", cert, key)
        b.proc.popen.send_signal(signal.SIGHUP)
        H.poll_until(lambda: peer_cn(port, trust) == "renewed", 10, "the renewed certificate after SIGHUP")
        # A renewal that does not load is logged, and the running certificate stays.
        key.write_text("not a key\n")
        b.proc.popen.send_signal(signal.SIGHUP)
        H.poll_until(lambda: "TLS certificate not reloaded" in b.proc.stderr_path.read_text(errors="replace"), 10,
                     "the log line for a renewal that did not load")
        time.sleep(0.2)
        assert peer_cn(port, trust) == "renewed"
        assert httpx2.get(b.base + "/healthz", verify=trust, timeout=5).status_code == 200
    finally:
        b.stop()


def write_client(ca: tuple, cn: str, cert_path: Path, key_path: Path) -> None:
    ca_key, ca_cert = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))


def test_upstreams_behind_tls_with_a_private_ca_and_a_client_certificate(tmp_path):
    """An http upstream served over TLS with a private CA is reached with `ca_file` (and not without it); one
    behind HAProxy requiring a client certificate (`verify required`) is reached with `client_cert`/`client_key`
    (and not without them)."""
    import clusterlib as CL

    for b in (H.BROKER_BIN, H.LEDGER_BIN, Path(CL.HAPROXY)):
        if not b.exists():
            pytest.fail(f"{b} is missing")
    ca = make_ca()
    ca_pem = tmp_path / "ca.pem"
    ca_pem.write_bytes(ca[1].public_bytes(serialization.Encoding.PEM))
    write_leaf(ca, "upstream", tmp_path / "up-cert.pem", tmp_path / "up-key.pem")
    write_client(ca, "broker-b", tmp_path / "client-cert.pem", tmp_path / "client-key.pem")
    # Upstream A: a broker serving the ledger over HTTPS (private CA).
    a = H.start_broker(tmp_path / "a", {"ledger": H.example_stdio_spec(H.LEDGER_BIN)},
                       broker={"tls": {"cert": str(tmp_path / "up-cert.pem"), "key": str(tmp_path / "up-key.pem")}},
                       name="upstream-a")
    # The same ledger over plain HTTP behind HAProxy terminating TLS and requiring a client certificate.
    plain = H.start_broker(tmp_path / "p", {"ledger": H.example_stdio_spec(H.LEDGER_BIN)}, name="upstream-plain")
    combined = tmp_path / "haproxy.pem"
    combined.write_bytes((tmp_path / "up-cert.pem").read_bytes() + (tmp_path / "up-key.pem").read_bytes())
    hport = H.free_port()
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(f"""global
    maxconn 100
defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend mtls
    bind 127.0.0.1:{hport} ssl crt {combined} ca-file {ca_pem} verify required
    default_backend up
backend up
    server p {plain.base[len("http://"):]}
""")
    hap = H.Proc("haproxy-mtls", [CL.HAPROXY, "-f", str(cfg), "-db"], tmp_path, capture_stdout=False)
    brokers = []
    try:
        H.poll_until(lambda: _listening(hport), 10, "HAProxy listening")
        tls_up = {"transport": "http", "url": a.url, "ca_file": str(ca_pem)}
        mtls_up = {"transport": "http", "url": f"https://127.0.0.1:{hport}/mcp", "ca_file": str(ca_pem),
                   "client_cert": str(tmp_path / "client-cert.pem"), "client_key": str(tmp_path / "client-key.pem")}
        good = H.start_broker(tmp_path / "good", {"a": tls_up, "m": mtls_up}, name="broker-good")
        brokers.append(good)
        H.wait_for_tools(good.url, ["a__ledger__list_accounts", "m__ledger__list_accounts"], 30)
        with H.RawSession(good.url, None) as s:
            s.initialize()
            for name in ("a__ledger__list_accounts", "m__ledger__list_accounts"):
                r = s.request("tools/call", {"name": name, "arguments": {}})
                assert not r["result"].get("isError"), r
        # Without the CA, or without the client certificate, the upstreams are not reached.
        bad = H.start_broker(tmp_path / "bad", {
            "a": {"transport": "http", "url": a.url, "connect_timeout": "3s"},
            "m": {"transport": "http", "url": mtls_up["url"], "ca_file": str(ca_pem), "connect_timeout": "3s"},
            "ledger": H.example_stdio_spec(H.LEDGER_BIN)}, name="broker-bad")
        brokers.append(bad)
        H.wait_for_tools(bad.url, ["ledger__list_accounts"], 30)
        time.sleep(3)
        with H.RawSession(bad.url, None) as s:
            s.initialize()
            names = {t["name"] for t in s.request("tools/list", {})["result"]["tools"]}
        assert not any(n.startswith(("a__", "m__")) for n in names), names
        log = bad.proc.stderr_path.read_text(errors="replace")
        assert "certificate" in log.lower() or "unknownissuer" in log.lower(), log[-3000:]
    finally:
        for b in brokers:
            b.stop()
        hap.stop()
        plain.stop()
        a.stop()


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False
