"""TLS on the wire and the refusal to start without an admin token.

A throwaway CA and a server certificate for 127.0.0.1 are made with the `openssl` command line;
the real `pum server --tls-cert … --tls-key …` runs on a loopback port. A worker that trusts the
CA (`--ca-file`) gets its lease; one that does not is stopped by certificate verification; plain
HTTP to the TLS port gets no answer.
"""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from pum.client.cli import http_client
from pum.demo.cluster import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command line")]


def openssl(*args: str, cwd: Path) -> None:
    result = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def make_pki(folder: Path) -> dict[str, Path]:
    """A CA and a server certificate for IP 127.0.0.1 and DNS localhost, signed by it."""
    folder.mkdir()
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=PUM throwaway test CA",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            cwd=folder)
    openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1", cwd=folder)
    (folder / "server.ext").write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
        "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid,issuer\n"
    )
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "server.pem", "-days", "2", "-extfile", "server.ext", cwd=folder)
    (folder / "server.key").chmod(0o600)
    return {"ca": folder / "ca.pem", "cert": folder / "server.pem", "key": folder / "server.key"}


def test_worker_needs_the_ca_to_talk_to_a_tls_server(tmp_path, server_process, tiny_model_dir):
    pki = make_pki(tmp_path / "pki")
    server = server_process(tls=(pki["cert"], pki["key"]), ca_file=pki["ca"])
    assert server.url.startswith("https://127.0.0.1:")
    ca = str(pki["ca"])

    with http_client(server.url, server.admin_token, ca_file=ca, timeout=30) as admin:
        body = {"task": "tls", "model_dir": str(tiny_model_dir), "pum": {"copies_m": 2, "rounds_R": 1}, "hyperparams": {}}
        job = admin.post("/v1/jobs", json=body).raise_for_status().json()["id"]
        token = admin.post(f"/v1/jobs/{job}/tokens", json={"label": "tls"}).raise_for_status().json()["token"]
        admin.post(f"/v1/jobs/{job}/start").raise_for_status()

    # trusted: the lease and the copy come over TLS
    with http_client(server.url, token, ca_file=ca, timeout=30) as worker:
        reply = worker.post("/v1/work/lease").raise_for_status().json()
        assert reply["status"] == "leased"
        copy = worker.get(f"/v1/work/leases/{reply['lease_id']}/copy")
        assert copy.status_code == 200 and len(copy.content) > 1000

    # not trusted: certificate verification stops the client before any request is sent
    with http_client(server.url, token, timeout=30) as untrusting:
        with pytest.raises(httpx.ConnectError) as refused:
            untrusting.post("/v1/work/lease")
    assert isinstance(refused.value.__context__, ssl.SSLCertVerificationError) or \
        "CERTIFICATE_VERIFY_FAILED" in str(refused.value), repr(refused.value)

    # plain HTTP to the TLS port: no HTTP answer at all
    plain = server.url.replace("https://", "http://")
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{plain}/healthz", timeout=10)

    # the admin command line takes --ca-file too
    result = subprocess.run(
        [sys.executable, "-m", "pum.cli", "admin", "--server", server.url, "--token", server.admin_token,
         "--ca-file", ca, "status", job, "--json"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "PUM_ADMIN_TOKEN": ""},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout)["id"] == job


def clean_env(home: Path) -> dict[str, str]:
    """No PUM_* variables, nothing inherited but PATH."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "LANG": "C.UTF-8"}


def run_server_cli(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    process = subprocess.Popen(
        [sys.executable, "-m", "pum.cli", "server", "--state-dir", str(tmp_path / "state"), "--host", "127.0.0.1",
         "--port", str(free_port()), *args],
        env=clean_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        stdout, stderr = process.communicate(timeout=15)
        pytest.fail(f"`pum server {' '.join(args)}` started instead of refusing:\n{stderr[-2000:]}")
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def test_server_refuses_to_start_without_an_admin_token(tmp_path):
    result = run_server_cli([], tmp_path)
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "PUM_ADMIN_TOKEN" in result.stderr and "Traceback" not in result.stderr, result.stderr[-2000:]


def test_server_refuses_half_a_tls_configuration(tmp_path):
    pki = make_pki(tmp_path / "pki")
    result = run_server_cli(["--dev", "--tls-cert", str(pki["cert"])], tmp_path)
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "tls_keyfile" in result.stderr and "Traceback" not in result.stderr, result.stderr[-2000:]
