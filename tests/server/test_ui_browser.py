"""/ui in a real browser: Debian's headless Chromium, driven over the DevTools protocol.

A real `pum server` runs a job (m = 2, R = 2) that two workers, gpu-a and gpu-b, take through
round 1 by the HTTP protocol, with one lease that expires. The test opens /ui, types the admin
token, submits, and reads what a person would: the job id, its state, round x/R, the workers'
labels, how a lease ended, the progress line and the privacy line. The screenshot goes to the test's
temporary folder (PUM_UI_SCREENSHOT=path keeps a copy; tests/artifacts/ holds one from a run).
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from safetensors.torch import load, save

from pum.demo.cluster import LocalServer

pytestmark = pytest.mark.e2e
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class Page:
    """One browser tab over the DevTools protocol: commands by name, results by id."""

    def __init__(self, ws):
        self.ws = ws  # a websockets.sync connection to the tab's DevTools endpoint
        self.ids = itertools.count(1)

    def call(self, method: str, **params) -> dict:
        sent = next(self.ids)
        self.ws.send(json.dumps({"id": sent, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv(timeout=30))
            if message.get("id") == sent:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout_s: float = 30.0):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.2)
        raise TimeoutError(f"{expression} never held; the page reads:\n{self.evaluate('document.body.innerText')}")



@pytest.fixture
def browser(tmp_path):
    """Headless Chromium with a DevTools port; yields a Page on about:blank."""
    if CHROMIUM is None:
        pytest.skip("chromium is not installed: apt-get install -y chromium (.ci/run installs it)")
    profile = tmp_path / "chromium-profile"
    process = subprocess.Popen(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
         "--remote-debugging-port=0", f"--user-data-dir={profile}", "--window-size=1200,900", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    from websockets.sync.client import connect

    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"chromium did not start (exit {process.poll()})")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        targets = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json()
        endpoint = next(t for t in targets if t["type"] == "page")["webSocketDebuggerUrl"]
        with connect(endpoint, max_size=64 * 2**20, open_timeout=20) as ws:
            yield Page(ws)
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def delta(copy: bytes) -> bytes:
    return save({n: (0.01 * t.float()).contiguous() for n, t in load(copy).items()})


def run_round_one(url: str, admin: httpx.Client, model_dir: Path) -> str:
    """A job whose round 1 is done by gpu-a and gpu-b, one of gpu-b's leases having expired (TTL 1.5 s)."""
    body = {"task": "ui", "model_dir": str(model_dir), "pum": {"copies_m": 2, "rounds_R": 2, "noise_kappa": 0.01}}
    job = admin.post("/v1/jobs", json=body).json()["id"]
    assert admin.post(f"/v1/jobs/{job}/start").status_code == 200
    workers = {}
    for label in ("gpu-a", "gpu-b"):
        token = admin.post(f"/v1/jobs/{job}/tokens", json={"label": label}).json()["token"]
        workers[label] = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30)
    try:
        lost = workers["gpu-b"].post("/v1/work/lease").json()
        assert lost["status"] == "leased", lost
        time.sleep(2.0)  # past the TTL: the next lease call sweeps it
        for label, worker in workers.items():
            reply = worker.post("/v1/work/lease").json()
            assert reply["status"] == "leased", reply
            copy = worker.get(f"/v1/work/leases/{reply['lease_id']}/copy").content
            assert worker.put(f"/v1/work/leases/{reply['lease_id']}/delta", content=delta(copy)).status_code == 200
    finally:
        for worker in workers.values():
            worker.close()
    return job


def test_the_status_page_shows_a_job_to_a_person_with_the_token(tmp_path, browser, tiny_model_dir):
    server = LocalServer(state_dir=tmp_path / "state", saves_dir=tmp_path / "saves", lease_ttl_s=1.5,
                         log_path=tmp_path / "server.log")
    with server, httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {server.admin_token}"},
                              timeout=30) as admin:
        job = run_round_one(server.url, admin, tiny_model_dir)
        assert admin.get(f"/v1/jobs/{job}").json()["round"] == 2

        browser.call("Page.enable")
        browser.call("Page.navigate", url=f"{server.url}/ui")
        browser.wait_for("document.readyState === 'complete' && !!document.querySelector('#token')")
        assert job not in browser.evaluate("document.documentElement.outerHTML")  # the page carries no data

        browser.evaluate("document.querySelector('#token').focus()")
        browser.call("Input.insertText", text="not-the-token")
        browser.evaluate("document.querySelector('#show').click()")
        assert "token refused" in browser.wait_for("document.querySelector('#message').innerText.includes('refused') "
                                                   "&& document.querySelector('#message').innerText")

        browser.evaluate("document.querySelector('#token').focus()")
        browser.call("Input.insertText", text=server.admin_token)
        browser.evaluate("document.querySelector('#show').click()")
        text = browser.wait_for(f"document.body.innerText.includes('{job}') && document.body.innerText")
        assert browser.evaluate("sessionStorage.getItem('pumAdminToken')") == server.admin_token
        assert browser.evaluate("localStorage.length") == 0
        assert browser.evaluate("document.querySelector('#token').value") == ""

        card = browser.evaluate(f"document.getElementById('job-{job}').innerText")
        assert "running" in card and "round 2/2" in card, card
        assert "copies 2/4 accepted" in card and "copies/h" in card and "ETA" in card, card
        assert "privacy: no ε" in card, card
        assert "round 1" in card and "merged" in card, card
        workers = browser.evaluate("[...document.querySelectorAll('tr.copy td.worker')].map(td => td.innerText)")
        assert sorted(w for w in workers if w != "-") == ["gpu-a", "gpu-b"], workers
        assert "expired 1" in card, card

        shot = tmp_path / "ui.png"
        shot.write_bytes(base64.b64decode(browser.call("Page.captureScreenshot", format="png")["data"]))
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
        if os.environ.get("PUM_UI_SCREENSHOT"):
            shutil.copy(shot, os.environ["PUM_UI_SCREENSHOT"])

        headers = admin.get("/ui").headers
        assert "default-src 'none'" in headers["content-security-policy"] and "http" not in headers["content-security-policy"]
        assert text.count(job) == 1
