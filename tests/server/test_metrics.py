"""/metrics: each metric of a job driven through the work protocol, with the values the job implies.

The job (m = 2, R = 2, manual σ so the report has an ε) sees one copy given back, one lease
that expires, one refused upload and four accepted ones; the scrape must count exactly those,
bytes served must be the copies' sizes as the workers received them, and the states must be the
store's. The dashboard in deploy/ may only ask for metrics the server exports.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from safetensors.torch import load, save


M, R = 2, 2
DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana-dashboard.json"


def scrape(client) -> dict[str, dict[tuple, float]]:
    """name of each sample → {sorted label items: value}."""
    response = client.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    samples: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def value(samples, name: str, **labels) -> float:
    return samples[name][tuple(sorted(labels.items()))]


def delta(copy: bytes, scale: float = 0.01) -> bytes:
    return save({n: (scale * t.float()).contiguous() for n, t in load(copy).items()})


def test_metrics_count_what_a_job_did(server, tiny_model_dir, base_dir):
    job = server.create_job(tiny_model_dir, {"copies_m": M, "rounds_R": R, "sigma": 0.01, "jitter_tau": 0.001,
                                             "base_model": str(base_dir), "center_clip_C_per_layer": 0.5,
                                             "center_clip_C_global": 0.5})
    worker = server.worker(server.token(job, "gpu-a"))
    received, copies_bytes = 0, 0

    def lease() -> str:
        reply = worker.post("/v1/work/lease").json()
        assert reply["status"] == "leased", reply
        return reply["lease_id"]

    def download(lease_id: str) -> bytes:
        nonlocal copies_bytes
        body = worker.get(f"/v1/work/leases/{lease_id}/copy").content
        copies_bytes += len(body)
        return body

    before = scrape(server.admin)
    assert value(before, "pum_jobs", state="running") == 1 and value(before, "pum_job_round", job=job) == 1
    assert value(before, "pum_copies", job=job, state="pending") == M

    given_back = lease()
    download(given_back)
    assert worker.post(f"/v1/work/leases/{given_back}/release", json={"reason": "CUDA out of memory"}).status_code == 200
    expiring = lease()
    server.clock.now += server.settings.lease_ttl_s + 1
    refused = lease()  # sweeps the expired lease first
    copy = download(refused)
    assert worker.put(f"/v1/work/leases/{refused}/delta", content=b"not safetensors").status_code == 400

    during = scrape(server.admin)
    assert value(during, "pum_copies", job=job, state="leased") == 1
    assert value(during, "pum_leases", job=job, state="active") == 1
    assert value(during, "pum_leases", job=job, state="expired") == 1 and expiring
    assert value(during, "pum_leases", job=job, state="failed") == 1
    assert value(during, "pum_leases_granted_total", job=job) == 3

    body = delta(copy)
    assert worker.put(f"/v1/work/leases/{refused}/delta", content=body).status_code == 200
    received += len(body)
    for _ in range(M * R - 1):
        lease_id = lease()
        body = delta(download(lease_id))
        assert worker.put(f"/v1/work/leases/{lease_id}/delta", content=body).status_code == 200
        received += len(body)

    after = scrape(server.admin)
    assert value(after, "pum_jobs", state="finalized") == 1 and value(after, "pum_jobs", state="running") == 0
    assert value(after, "pum_job_rounds_merged", job=job) == R and value(after, "pum_job_rounds", job=job) == R
    assert value(after, "pum_copies_accepted_total", job=job) == M * R
    assert value(after, "pum_leases", job=job, state="done") == M * R
    assert value(after, "pum_served_bytes_total", what="copy") == copies_bytes
    assert value(after, "pum_received_bytes_total") == received + len(b"not safetensors")
    assert value(after, "pum_failures_total", reason="given_back") == 1
    assert value(after, "pum_failures_total", reason="lease_expired") == 1
    assert value(after, "pum_failures_total", reason="upload_invalid_input") == 1
    downloads = 1 + M * R  # the given-back copy and one per accepted upload
    assert value(after, "pum_copy_generation_seconds_count") == downloads
    assert value(after, "pum_upload_seconds_count") == M * R
    assert value(after, "pum_merge_seconds_count") == M * R
    assert value(after, "pum_step_seconds_count") == R
    assert value(after, "pum_step_seconds_sum") > 0
    report = server.admin.get(f"/v1/jobs/{job}/privacy").json()
    assert report["epsilon"] is not None
    expected = math.inf if report["epsilon"] == "inf" else report["epsilon"]
    assert value(after, "pum_privacy_epsilon", job=job) == pytest.approx(expected)


def test_metrics_need_the_admin_token(server, tiny_model_dir):
    job = server.create_job(tiny_model_dir, {"copies_m": M, "rounds_R": 1})
    worker = server.worker(server.token(job))
    assert worker.get("/metrics").status_code == 403
    assert server.worker("nope").get("/metrics").status_code == 401
    assert "/metrics" not in server.admin.get("/openapi.json").json()["paths"]  # the JSON API's document only


def test_each_app_has_its_own_registry(server, server_factory, tmp_path, tiny_model_dir):
    """Two servers in one process count apart: no module-level registry."""
    other = server_factory(tmp_path / "other")
    job = server.create_job(tiny_model_dir, {"copies_m": M, "rounds_R": 1})
    worker = server.worker(server.token(job))
    worker.get(f"/v1/work/leases/{worker.post('/v1/work/lease').json()['lease_id']}/copy")
    assert value(scrape(server.admin), "pum_served_bytes_total", what="copy") > 0
    assert "pum_served_bytes_total" not in scrape(other.admin)  # no sample before its first copy
    assert value(scrape(other.admin), "pum_jobs", state="running") == 0


def test_a_job_without_an_epsilon_has_no_epsilon_sample(server, tiny_model_dir):
    job = server.create_job(tiny_model_dir, {"copies_m": M, "rounds_R": 1, "noise_kappa": 0.01})
    assert server.admin.get(f"/v1/jobs/{job}/privacy").json()["epsilon"] is None
    assert job not in {dict(labels).get("job") for labels in scrape(server.admin).get("pum_privacy_epsilon", {})}


def test_every_dashboard_expression_names_an_exported_metric(server, tiny_model_dir):
    job = server.create_job(tiny_model_dir, {"copies_m": M, "rounds_R": 1, "sigma": 0.01})
    worker = server.worker(server.token(job))
    lease_id = worker.post("/v1/work/lease").json()["lease_id"]
    copy = worker.get(f"/v1/work/leases/{lease_id}/copy").content
    worker.put(f"/v1/work/leases/{lease_id}/delta", content=delta(copy))
    worker.post(f"/v1/work/leases/{worker.post('/v1/work/lease').json()['lease_id']}/release", json={"reason": "x"})
    text = server.admin.get("/metrics").text
    families = {f.name: f.type for f in text_string_to_metric_families(text)}  # with or without samples yet
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    exported = {name + suffix for name, kind in families.items() for suffix in suffixes[kind]}
    assert set(scrape(server.admin)) <= exported | {n + "_created" for n in families}
    dashboard = json.loads(DASHBOARD.read_text())
    expressions = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(expressions) >= 10
    for expr in expressions:
        names = set(re.findall(r"\bpum_[a-z_]+", expr))
        assert names, expr
        assert names <= exported, (expr, names - exported)
