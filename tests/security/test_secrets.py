"""Nothing secret reaches a worker, a log line, or another user of the server's machine.

A whole job (m = 3, R = 2, with and without jitter τ) is driven as two workers, refused requests
included (wrong lease, someone else's lease, bad uploads, a second upload, an expired lease, a
released lease, bad ranges, admin endpoints). Every byte the workers receive (status, headers,
bodies, error bodies) and every log line is scanned for:

- the job key (raw, hex, base64, repr, any 16-byte window);
- α_k and 1/α_k (float32/float64 bytes, decimal text with ≥ 6 significant digits);
- every seed of z and ξ (decimal, hex, 8-byte little/big endian) and the α MACs;
- the copy index as a JSON field;
- z̄ and the raw z_k, ξ_k streams (any 16-byte window of their float32 bytes);
- the unperturbed center θ_r of each round (any 4-aligned 32-byte window of its float32 bytes).

The scanner is armed first: it must find each kind of secret where it was planted, and the
recorder must hold the copies the workers downloaded, so a silent scanner means a clean job.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import stat
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import httpx
import numpy as np
import pytest
import torch
from safetensors.torch import load, load_file, save

from pum.common.layers import layer_group
from pum.common.logs import JsonFormatter
from pum.common.noise import (
    CopyNoise, _mac, base_noise, derive_seed, draw_alphas, jitter_noise, job_key_from_seed, mean_base_noise,
)

SEED = 7
M, ROUNDS = 3, 2
FORBIDDEN_FIELDS = {"k", "copy", "copy_k", "copy_index", "index", "alpha", "alphas", "alpha_k", "seed", "seeds",
                    "key", "job_key", "zbar", "z_mean", "theta", "center"}


# ---- the scanner ------------------------------------------------------------------------------
@dataclass
class Scanner:
    """Named byte patterns: `exact` ones are searched as substrings; `windows` by width, hashed
    (every window of the haystack at every offset is looked up, so unaligned copies are found)."""

    exact: dict[bytes, str] = field(default_factory=dict)
    windows: dict[int, dict[bytes, str]] = field(default_factory=dict)

    def add(self, label: str, *patterns: bytes | str) -> None:
        for pattern in patterns:
            data = pattern.encode() if isinstance(pattern, str) else pattern
            if len(data) < 6:
                raise ValueError(f"pattern {data!r} of {label} is too short to mean anything")
            self.exact.setdefault(data, label)

    def add_windows(self, label: str, data: bytes, width: int, step: int = 4) -> None:
        table = self.windows.setdefault(width, {})
        for start in range(0, len(data) - width + 1, step):
            table.setdefault(data[start:start + width], label)

    def find(self, haystack: bytes) -> set[str]:
        hits = {label for pattern, label in self.exact.items() if pattern in haystack}
        for width, table in self.windows.items():
            seen = {haystack[i:i + width] for i in range(len(haystack) - width + 1)}
            hits |= {table[w] for w in seen if w in table}  # not seen.intersection(table): that walks the whole table
        return hits


def decimal_forms(x: float) -> set[str]:
    """x as decimal text with 6 significant digits, truncated and rounded, fixed and scientific
    (any rendering with ≥ 6 significant digits contains one of them); for x and float32(x)."""
    forms = set()
    for value in (x, float(np.float32(x))):
        text = f"{value:.25f}"
        first = next(i for i, c in enumerate(text) if c not in "0.")
        digits, taken = "", first
        while len(digits) < 6:
            if text[taken] != ".":
                digits += text[taken]
            taken += 1
        forms.add(text[:taken])  # truncated, fixed
        forms.add(f"{digits[0]}.{digits[1:]}")  # truncated mantissa
        rounded = f"{value:.5e}"
        forms.add(rounded.split("e")[0])  # rounded mantissa
        if 1e-4 <= abs(value) < 1e6:
            forms.add(f"{value:.{max(0, 5 - int(np.floor(np.log10(abs(value)))))}f}")  # rounded, fixed
    return forms


def number_bytes(x: float) -> list[bytes]:
    return [struct.pack(f, x) for f in ("<f", ">f", "<d", ">d")]


def f32_bytes(tensors: dict[str, torch.Tensor]) -> dict[str, bytes]:
    return {n: t.to(torch.float32).contiguous().numpy().tobytes() for n, t in tensors.items()}


@dataclass
class Secrets:
    key: bytes
    alphas: dict[int, list[float]]
    names: list[str]
    thetas: dict[int, dict[str, torch.Tensor]]
    zbars: dict[int, dict[str, torch.Tensor]]
    shapes: dict[str, tuple[int, ...]]

    def scanner(self) -> Scanner:
        scan = Scanner()
        key = self.key
        scan.add("job key", key, key.hex(), key.hex().upper(), base64.b64encode(key), base64.urlsafe_b64encode(key),
                 base64.b64encode(key).rstrip(b"="), base64.urlsafe_b64encode(key).rstrip(b"="), repr(key)[2:-1])
        scan.add_windows("job key", key, 16, step=1)
        for r, alphas in self.alphas.items():
            for k, alpha in enumerate(alphas):
                for value, what in ((alpha, "α"), (1 / alpha, "1/α")):
                    scan.add(f"{what} r{r} k{k}", *decimal_forms(value))
                    for data in number_bytes(value):
                        self._add_binary(scan, f"{what} r{r} k{k}", data)
                scan.add(f"α MAC r{r} k{k}", _mac(key, f"alpha/{r}/{k}")[:8])
                for name in self.names:
                    for purpose in ("z", "xi"):
                        seed = derive_seed(key, purpose, r, k, name)
                        label = f"seed {purpose} r{r} k{k} {name}"
                        scan.add(label, str(seed), f"{seed:x}", struct.pack("<Q", seed), struct.pack(">Q", seed),
                                 _mac(key, f"{purpose}/{r}/{k}/{name}")[:8])
                    shape = self.shapes[name]
                    scan.add_windows(f"z r{r} k{k}", f32_bytes({name: base_noise(key, r, k, name, shape)})[name], 16)
                    scan.add_windows(f"ξ r{r} k{k}", f32_bytes({name: jitter_noise(key, r, k, name, shape)})[name], 16)
        for r, zbar in self.zbars.items():
            for name, data in f32_bytes(zbar).items():
                scan.add_windows(f"z̄ r{r} {name}", data, 16)
        for r, theta in self.thetas.items():
            for name, data in f32_bytes(theta).items():
                scan.add_windows(f"θ r{r} {name}", data, 32)
        return scan

    @staticmethod
    def _add_binary(scan: Scanner, label: str, data: bytes) -> None:
        # a 4-byte float32 alone matches random data too often to be a finding; its 8-byte
        # forms (float64) are searched as they are
        if len(data) >= 8:
            scan.add(label, data)


def json_fields(value) -> set[str]:
    if isinstance(value, dict):
        return set(value) | {f for v in value.values() for f in json_fields(v)}
    if isinstance(value, list):
        return {f for v in value for f in json_fields(v)}
    return set()


# ---- recording what a worker receives ----------------------------------------------------------
@dataclass
class Recorder:
    """Every response a client received: status line, raw headers and body."""

    records: list[tuple[str, bytes]] = field(default_factory=list)
    json_bodies: list[object] = field(default_factory=list)

    def attach(self, client: httpx.Client) -> httpx.Client:
        client.event_hooks = {"request": [], "response": [self._record]}
        return client

    def _record(self, response: httpx.Response) -> None:
        response.read()
        head = f"HTTP {response.status_code} {response.reason_phrase}\r\n".encode()
        head += b"".join(name + b": " + value + b"\r\n" for name, value in response.headers.raw)
        label = f"{response.status_code} {response.request.method} {response.request.url.path}"
        self.records.append((label, head + b"\r\n" + response.content))
        if response.headers.get("content-type", "").startswith("application/json"):
            self.json_bodies.append(response.json())

    def statuses(self) -> list[int]:
        return [int(label.split()[0]) for label, _ in self.records]


# ---- driving a job as workers --------------------------------------------------------------------
@dataclass
class Harness:
    """What the driver needs from a server, in-process or real."""

    admin: httpx.Client
    worker: Callable[[str | None], httpx.Client]  # a client with that worker token (None: no token)
    state_dir: Path
    expire_leases: Callable[[], None]  # make every live lease run out


@dataclass
class Trace:
    recorder: Recorder
    secrets: Secrets
    downloads: dict[str, bytes]  # lease id → the copy's bytes as received
    sigmas: dict[int, dict[str, float]]
    modes: dict[str, int]  # secret file → its permission bits, looked at while it existed


def expect(response: httpx.Response, status: int) -> httpx.Response:
    assert response.status_code == status, f"{response.request.method} {response.request.url.path}: {response.text[:300]}"
    return response


def small_delta(copy: bytes) -> bytes:
    return save({n: (0.01 * t.float()).contiguous() for n, t in load(copy).items()})


def bad_bodies(good: bytes) -> list[tuple[bytes, int]]:
    tensors = load(good)
    name = next(iter(tensors))
    return [
        (save({**tensors, name: torch.zeros(3, 3)}), 400),
        (save({**tensors, name: torch.full(tensors[name].shape, float("nan"))}), 400),
        (good + b"\0" * 8192, 413),
        (b"not a safetensors file", 400),
    ]


def drive_job(h: Harness, job_id: str) -> Trace:
    """Two workers through every round, with refusals of each kind; returns what they received."""
    recorder = Recorder()
    root = h.state_dir / "jobs" / job_id
    a_token = expect(h.admin.post(f"/v1/jobs/{job_id}/tokens", json={"label": "a"}), 201).json()["token"]
    b_token = expect(h.admin.post(f"/v1/jobs/{job_id}/tokens", json={"label": "b"}), 201).json()["token"]
    a, b, anon = (recorder.attach(h.worker(t)) for t in (a_token, b_token, None))
    thetas, zbars, downloads, modes = {}, {}, {}, {}
    modes["secret.key"] = (root / "secret.key").stat().st_mode
    modes["state.db"] = (h.state_dir / "state.db").stat().st_mode

    def download(client: httpx.Client, lease_id: str) -> bytes:
        downloads[lease_id] = expect(client.get(f"/v1/work/leases/{lease_id}/copy"), 200).content
        return downloads[lease_id]

    def lease(client: httpx.Client) -> dict:
        return expect(client.post("/v1/work/lease"), 200).json()

    expect(anon.post("/v1/work/lease"), 401)
    expect(a.get("/v1/jobs"), 403)
    expect(a.get(f"/v1/jobs/{job_id}"), 403)
    expect(a.post(f"/v1/jobs/{job_id}/tokens", json={"label": "x"}), 403)
    for round_ in range(1, ROUNDS + 1):
        thetas[round_] = load_file(root / f"theta_r{round_}.safetensors")
        zbar_path = root / "rounds" / f"r{round_}" / "zbar.safetensors"
        zbars[round_] = load_file(zbar_path)
        modes[f"zbar r{round_}"] = zbar_path.stat().st_mode

        first = lease(a)
        assert first["status"] == "leased" and first["round"] == round_
        for name in first["public_files"]:
            expect(a.get(f"/v1/work/files/{name}"), 200)
        for name in ("secret.key", "..%2Fsecret.key", "model.safetensors", f"..%2Ftheta_r{round_}.safetensors"):
            expect(a.get(f"/v1/work/files/{name}"), 404)
        l1 = first["lease_id"]
        l2 = lease(b)["lease_id"]
        l3 = lease(a)["lease_id"]
        assert lease(a)["status"] == "wait"

        copy = download(a, l1)
        assert expect(a.get(f"/v1/work/leases/{l1}/copy", headers={"Range": "bytes=100-"}), 206).content == copy[100:]
        expect(a.get(f"/v1/work/leases/{l1}/copy", headers={"Range": f"bytes={len(copy)}-"}), 416)
        expect(a.get(f"/v1/work/leases/{l1}/copy", headers={"Range": "bytes=0-10"}), 400)
        expect(b.post(f"/v1/work/leases/{l1}/heartbeat"), 403)
        expect(b.get(f"/v1/work/leases/{l1}/copy"), 403)
        expect(a.post("/v1/work/leases/lease-nope/heartbeat"), 404)
        expect(a.get("/v1/work/leases/lease-nope/copy"), 404)
        expect(a.post(f"/v1/work/leases/{l1}/heartbeat"), 200)
        good = small_delta(copy)
        for body, status in bad_bodies(good):
            expect(a.put(f"/v1/work/leases/{l1}/delta", content=body), status)
        expect(a.put(f"/v1/work/leases/{l1}/delta", content=good), 200)
        expect(a.put(f"/v1/work/leases/{l1}/delta", content=good), 409)
        expect(a.get(f"/v1/work/leases/{l1}/copy"), 409)

        download(a, l3)
        expect(a.post(f"/v1/work/leases/{l3}/release", json={"reason": "test: giving it back"}), 200)
        expect(a.post(f"/v1/work/leases/{l3}/heartbeat"), 410)

        late = download(b, l2)
        h.expire_leases()
        expect(b.put(f"/v1/work/leases/{l2}/delta", content=small_delta(late)), 410)
        expect(b.post(f"/v1/work/leases/{l2}/heartbeat"), 410)
        expect(b.get(f"/v1/work/leases/{l2}/copy"), 410)

        for _ in range(2):  # the released and the expired copy, re-offered
            again = lease(b)
            assert again["status"] == "leased" and again["round"] == round_, again
            expect(b.put(f"/v1/work/leases/{again['lease_id']}/delta", content=small_delta(download(b, again["lease_id"]))), 200)
        status = expect(h.admin.get(f"/v1/jobs/{job_id}"), 200).json()
        assert status["rounds"][round_ - 1]["accepted"] == M and status["rounds"][round_ - 1]["state"] == "merged"

    assert lease(a)["status"] == "done" and lease(b)["status"] == "done"
    expect(a.post(f"/v1/work/leases/{l1}/heartbeat"), 409)
    status = expect(h.admin.get(f"/v1/jobs/{job_id}"), 200).json()
    assert status["state"] == "finalized"
    settings = status["settings"]
    key = (root / "secret.key").read_bytes() if (root / "secret.key").exists() else job_key_from_seed(SEED)
    assert key == job_key_from_seed(SEED)
    names = list(thetas[1])
    secrets = Secrets(
        key=key,
        alphas={r: draw_alphas(key, r, M, settings["alpha_min"], settings["alpha_max"]) for r in thetas},
        names=names, thetas=thetas, zbars=zbars, shapes={n: tuple(t.shape) for n, t in thetas[1].items()},
    )
    sigmas = {r["round"]: r["sigmas"] for r in status["rounds"]}
    return Trace(recorder, secrets, downloads, sigmas, modes)


# ---- checks ---------------------------------------------------------------------------------------
def check_secrets_are_the_servers(trace: Trace, lease_k: dict[str, tuple[int, int]], tau: float) -> None:
    """The key, α, seeds and z̄ searched for are the ones the server used: the published copies
    are recomputed from them bit for bit (else a clean scan would prove nothing)."""
    s = trace.secrets
    for r, zbar in s.zbars.items():
        for name, tensor in zbar.items():
            assert torch.equal(tensor, mean_base_noise(s.key, r, M, name, tensor.shape)), f"z̄ r{r} {name}"
    checked = 0
    for lease_id, body in trace.downloads.items():
        r, k = lease_k[lease_id]
        noise = CopyNoise(s.key, r, k, M, s.alphas[r][k], tau, "zero_sum")
        for name, published in load(body).items():
            expected = noise.add_noise_inplace(
                name, s.thetas[r][name].clone(), trace.sigmas[r][layer_group(name)], s.zbars[r][name]
            )
            assert torch.equal(published, expected), f"copy r{r} k{k} {name} is not θ + α·σ·ε + τ·ξ"
            checked += 1
    assert checked >= len(s.names) * M * ROUNDS


def arm(scanner: Scanner, trace: Trace) -> None:
    """Positive controls: the scanner finds every kind of secret where it is planted."""
    s = trace.secrets
    rng = np.random.default_rng(0)
    noise = lambda n: rng.integers(0, 256, n, dtype=np.uint8).tobytes()  # noqa: E731
    name = s.names[1]
    theta_bytes = f32_bytes(s.thetas[2])[name]
    zbar_bytes = f32_bytes(s.zbars[1])[name]
    seed = derive_seed(s.key, "xi", 2, 1, name)
    alpha = s.alphas[2][2]
    planted = {
        "θ itself": (b"".join(f32_bytes(s.thetas[1]).values()), "θ r1"),
        "θ saved as safetensors": (save(s.thetas[2]), "θ r2"),
        "θ at an odd offset": (noise(3) + theta_bytes[4:40] + noise(5), "θ r2"),
        "z̄ at an odd offset": (noise(7) + zbar_bytes[8:24] + noise(3), "z̄ r1"),
        "key hex in a log line": (f"job key is {s.key.hex()}".encode(), "job key"),
        "key base64": (base64.b64encode(s.key), "job key"),
        "key half, raw": (noise(9) + s.key[5:21] + noise(2), "job key"),
        "α in JSON": (json.dumps({"a": alpha}).encode(), "α r2 k2"),
        "α to 6 digits": (f"α={alpha:.6g}".encode(), "α r2 k2"),
        "α to 8 decimals": (f"{alpha:.8f}".encode(), "α r2 k2"),
        "α in float64": (noise(5) + struct.pack("<d", alpha), "α r2 k2"),
        "1/α printed": (f"w={1 / alpha}".encode(), "1/α r2 k2"),
        "seed decimal": (f"seed {seed}".encode(), f"seed xi r2 k1 {name}"),
        "seed bytes": (noise(3) + struct.pack("<Q", seed) + noise(3), f"seed xi r2 k1 {name}"),
    }
    for what, (haystack, label) in planted.items():
        hits = scanner.find(haystack)
        assert any(hit == label or hit.startswith(label + " ") for hit in hits), f"{what}: found only {hits}"
    assert not scanner.find(noise(50_000)), "the scanner finds secrets in random bytes"
    assert {"k", "copy_index"} <= json_fields({"lease": {"k": 1}, "x": [{"copy_index": 0}]})
    # the recorder holds what the workers downloaded: the scan is over the real bytes
    everything = b"".join(body for _, body in trace.recorder.records)
    assert all(copy in everything for copy in trace.downloads.values())
    assert len(trace.downloads) == ROUNDS * (M + 2)


def admin_outputs(admin: httpx.Client, job: str) -> list[tuple[str, str]]:
    """What the operator's tools read: /metrics, the /ui page, the status document and table."""
    from pum.client.admin import AdminAPI
    from pum.client.status_view import status_table

    outputs = []
    for path in ("/metrics", "/ui", f"/v1/jobs/{job}", f"/v1/jobs/{job}/privacy"):
        response = admin.get(path)
        assert response.status_code == 200, (path, response.text[:300])
        outputs.append((f"GET {path}", response.text))
    api = AdminAPI(admin)
    outputs.append(("pum admin status", status_table(api.status(job), api.privacy(job))))
    assert "pum_served_bytes_total" in outputs[0][1] and "<html" in outputs[1][1].lower()
    return outputs


def loose_bits(mode: int) -> int:
    return stat.S_IMODE(mode) & 0o077


def assert_clean(scanner: Scanner, trace: Trace, logs: list[tuple[str, str]]) -> None:
    statuses = set(trace.recorder.statuses())
    assert {200, 206, 400, 401, 403, 404, 409, 410, 413, 416} <= statuses  # refused requests were recorded too
    assert 500 not in statuses
    found = {label: hits for label, body in trace.recorder.records if (hits := scanner.find(body))}
    assert not found, f"secrets in what a worker received: {found}"
    fields = set().union(*(json_fields(body) for body in trace.recorder.json_bodies))
    assert not fields & FORBIDDEN_FIELDS, f"secret fields sent to a worker: {fields & FORBIDDEN_FIELDS}"
    for copy in trace.downloads.values():  # nothing rides in the copy's safetensors header either
        header = json.loads(copy[8:8 + struct.unpack("<Q", copy[:8])[0]])
        assert set(header.get("__metadata__", {})) <= {"format"}, header.get("__metadata__")
    leaked = {where: hits for where, line in logs if (hits := scanner.find(line.encode()))}
    assert not leaked, f"secrets in log lines: {leaked}"
    for what, mode in trace.modes.items():
        assert loose_bits(mode) == 0, f"{what} has mode {oct(stat.S_IMODE(mode))}: group/other may read it"


# ---- the tests -------------------------------------------------------------------------------------
def test_scanner_helpers_can_fail(tmp_path):
    """The helpers the checks rest on report what they should."""
    loose = tmp_path / "loose"
    loose.write_bytes(b"x")
    loose.chmod(0o640)
    assert loose_bits(loose.stat().st_mode) == 0o040
    assert "1.23456" in decimal_forms(1.2345678) and "0.512345" in decimal_forms(0.51234567)
    assert "5.12346" in decimal_forms(0.51234567)  # rounded mantissa of 5.1234567e-01
    assert all(len([c for c in f if c.isdigit()]) >= 6 for f in decimal_forms(1.5))


# the fast tier scans the job with jitter (every secret kind is drawn); the full suite scans one without too
@pytest.mark.parametrize("tau", [pytest.param(0.0, marks=pytest.mark.slow, id="no-jitter"), pytest.param(1e-3, id="jitter")])
def test_no_secret_reaches_a_worker_or_a_log(server, tiny_model_dir, caplog, tau):
    caplog.set_level(logging.DEBUG)
    for name in ("pum", "uvicorn", "uvicorn.access", "uvicorn.error", "httpx", "fastapi"):
        caplog.set_level(logging.DEBUG, logger=name)
    job = server.create_job(tiny_model_dir, {"copies_m": M, "rounds_R": ROUNDS, "jitter_tau": tau, "noise_kappa": 0.05})

    def expire() -> None:
        server.clock.now += server.settings.lease_ttl_s + 1

    def worker(token: str | None) -> httpx.Client:
        client = server.worker(token) if token else server.worker("")
        if token is None:
            client.headers.pop("Authorization")
        return client

    harness = Harness(server.admin, worker, server.settings.state_dir, expire)
    trace = drive_job(harness, job)
    lease_k = {lease.id: (lease.round, lease.k) for lease in server.service.store.leases(job)}
    check_secrets_are_the_servers(trace, lease_k, tau)

    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    logs = [(f"{r.name}:{r.lineno}", formatter.format(r) + " " + repr(r.args)) for r in caplog.records]
    assert any("granted" in line for _, line in logs) and any("expired" in line for _, line in logs)
    assert any(r.name.startswith("pum.") for r in caplog.records)
    # the same records as `--log-format json` writes them: the structured fields are scanned too
    as_json = [(f"json {r.name}:{r.lineno}", JsonFormatter().format(r)) for r in caplog.records]
    assert sum('"lease": "lease-' in line and '"worker": "' in line for _, line in as_json) >= 4
    logs += as_json + admin_outputs(server.admin, job)

    scanner = trace.secrets.scanner()
    arm(scanner, trace)
    assert_clean(scanner, trace, logs)


@pytest.mark.e2e
@pytest.mark.parametrize("log_format", ["text", "json"])
def test_no_secret_on_the_wire_or_in_the_log_of_a_real_server(server_process, tiny_model_dir, state_db, log_format):
    """The same job against `pum --log-level DEBUG --log-format FORMAT server` on 127.0.0.1: uvicorn's
    own logs too; then what the operator reads (/metrics, /ui, status)."""
    ttl = 2.5
    srv = server_process(lease_ttl_s=ttl, log_level="DEBUG", dev=True, log_format=log_format)  # a seeded job
    with httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {srv.admin_token}"}, timeout=30) as admin:
        body = {"task": "secrets", "model_dir": str(tiny_model_dir), "hyperparams": {"lr": 1e-3},
                "pum": {"seed": SEED, "copies_m": M, "rounds_R": ROUNDS, "jitter_tau": 1e-3, "noise_kappa": 0.05}}
        job = expect(admin.post("/v1/jobs", json=body), 201).json()["id"]
        expect(admin.post(f"/v1/jobs/{job}/start"), 200)
        clients: list[httpx.Client] = []

        def worker(token: str | None) -> httpx.Client:
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            clients.append(httpx.Client(base_url=srv.url, headers=headers, timeout=30))
            return clients[-1]

        harness = Harness(admin, worker, srv.state_dir, lambda: time.sleep(ttl + 0.5))
        try:
            trace = drive_job(harness, job)
        finally:
            for client in clients:
                client.close()
        operator = admin_outputs(admin, job)
    check_secrets_are_the_servers(trace, state_db.lease_copies(srv.state_dir), 1e-3)
    srv.stop()
    log = raw = srv.log_text()
    if log_format == "json":
        events = [json.loads(line) for line in raw.splitlines() if line.strip()]  # every line is one JSON event
        log = "\n".join(event["message"] for event in events)
        served = [e for e in events if "served" in e["message"]]
        assert served and all({"job", "round", "copy", "lease", "worker", "bytes", "seconds"} <= set(e) for e in served)
        assert {e["worker"] for e in served} == {"a", "b"}
        assert sum(e["bytes"] for e in served if e["message"].endswith("s)")) > 0
    assert "granted" in log and "expired" in log and '"POST /v1/work/lease HTTP/1.1" 200' in log  # access log on
    scanner = trace.secrets.scanner()
    arm(scanner, trace)
    assert_clean(scanner, trace, [(f"server.log:{i}", line) for i, line in enumerate(raw.splitlines())] + operator)


# ---- secrets at rest --------------------------------------------------------------------------------
@pytest.fixture
def umask_022():
    """Tests of file modes run under the common umask, whatever the caller's."""
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def test_sqlite_wal_and_shm_files_are_private(tiny_model_dir, server_factory, tmp_path, umask_022):
    server = server_factory(tmp_path)
    server.create_job(tiny_model_dir, {"copies_m": 2, "rounds_R": 1})
    state = server.settings.state_dir
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in state.glob("state.db*")}
    assert {"state.db", "state.db-wal", "state.db-shm"} <= set(modes)
    assert all(mode & 0o077 == 0 for mode in modes.values()), {n: oct(m) for n, m in modes.items()}


def test_no_blob_is_readable_by_others_while_it_is_written(tiny_model_dir, server_factory, tmp_path, umask_022, monkeypatch):
    """Every file of a job (z̄, θ, the key, …) is 0600 from its first byte to its rename."""
    from pum.server.blobs.local import LocalWriter

    seen: dict[str, int] = {}
    init, commit = LocalWriter.__init__, LocalWriter.commit

    def watched_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        seen[self.key + " (created)"] = stat.S_IMODE(self.temporary.stat().st_mode)

    def watched_commit(self):
        seen[self.key + " (written)"] = stat.S_IMODE(self.temporary.stat().st_mode)
        commit(self)
        seen[self.key + " (renamed)"] = stat.S_IMODE(self.target.stat().st_mode)

    monkeypatch.setattr(LocalWriter, "__init__", watched_init)
    monkeypatch.setattr(LocalWriter, "commit", watched_commit)
    server = server_factory(tmp_path)
    server.create_job(tiny_model_dir, {"copies_m": 2, "rounds_R": 1})
    assert any("zbar" in name for name in seen) and any("secret.key" in name for name in seen), sorted(seen)
    assert all(mode & 0o077 == 0 for mode in seen.values()), {n: oct(m) for n, m in seen.items()}
