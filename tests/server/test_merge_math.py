"""The two laws PUM rests on, checked on real published copies and real uploads over HTTP."""

from __future__ import annotations

import torch
from safetensors.torch import load, load_file, save

from pum.common.codec import SafetensorsFile


def lease_and_download(worker, server) -> tuple[str, int, dict[str, torch.Tensor]]:
    reply = worker.post("/v1/work/lease").json()
    assert reply["status"] == "leased"
    copy = load(worker.get(f"/v1/work/leases/{reply['lease_id']}/copy").content)
    k = server.service.store.lease(reply["lease_id"]).k  # the copy index is never sent; read it server-side
    return reply["lease_id"], k, copy


def test_harmonic_mean_of_published_copies_is_the_center_and_plain_mean_is_not(server, tiny_model_dir):
    job = server.create_job(tiny_model_dir, {"copies_m": 4, "rounds_R": 1, "noise_kappa": 0.1, "alpha_max": 3.0})
    worker = server.worker(server.token(job))
    copies = {}
    for _ in range(4):
        _, k, copy = lease_and_download(worker, server)
        copies[k] = copy
    alphas = server.alphas(job)
    center = load_file(tiny_model_dir / "model.safetensors")
    s0 = sum(1 / a for a in alphas)
    worst_weighted, worst_plain = 0.0, 0.0
    for name, theta in center.items():
        weighted = sum(copies[k][name].double() / alphas[k] for k in range(4)) / s0
        plain = sum(copies[k][name].double() for k in range(4)) / 4
        scale = theta.abs().max().item()
        worst_weighted = max(worst_weighted, (weighted - theta.double()).abs().max().item() / scale)
        worst_plain = max(worst_plain, (plain - theta.double()).abs().max().item() / scale)
        assert not torch.equal(copies[0][name], theta), f"{name} was published unperturbed"
    assert worst_weighted < 1e-6  # float32 precision
    assert worst_plain > 1e-3  # the unweighted mean keeps Σ α_k ε_k / m ≠ 0


def test_merged_update_is_eta_times_harmonic_mean_of_deltas(server, tiny_model_dir):
    eta = 0.7
    job = server.create_job(tiny_model_dir, {"copies_m": 3, "rounds_R": 1, "eta_srv": eta})
    worker = server.worker(server.token(job))
    deltas = {}
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        lease_id, k, copy = lease_and_download(worker, server)
        deltas[k] = {n: torch.randn(t.shape, generator=generator) * 0.01 for n, t in copy.items()}
        assert worker.put(f"/v1/work/leases/{lease_id}/delta", content=save(deltas[k])).status_code == 200
    status = server.admin.get(f"/v1/jobs/{job}").json()
    assert status["state"] == "finalized"

    alphas = server.alphas(job)
    theta = load_file(tiny_model_dir / "model.safetensors")
    merged = load_file(f"{status['output_dir']}/model.safetensors")
    s0 = sum(1 / a for a in alphas)
    for name, before in theta.items():
        expected = before.double() + eta * sum(deltas[k][name].double() / alphas[k] for k in range(3)) / s0
        torch.testing.assert_close(merged[name].double(), expected, rtol=0, atol=1e-6)


def test_two_rounds_compose_and_the_saved_model_loads(server, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    job = server.create_job(tiny_model_dir, {"copies_m": 2, "rounds_R": 2})
    worker = server.worker(server.token(job))
    for round_ in (1, 2):
        for _ in range(2):
            lease_id, _, copy = lease_and_download(worker, server)
            delta = {n: torch.full(t.shape, 0.01) for n, t in copy.items()}
            assert worker.put(f"/v1/work/leases/{lease_id}/delta", content=save(delta)).json()["accepted"]
    status = server.admin.get(f"/v1/jobs/{job}").json()
    assert status["state"] == "finalized" and [r["state"] for r in status["rounds"]] == ["merged", "merged"]
    model = AutoModelForCausalLM.from_pretrained(status["output_dir"])
    before = load_file(tiny_model_dir / "model.safetensors")
    for name, tensor in model.state_dict().items():
        if name in before:  # a constant delta of 0.01 per round, twice, with η = 1
            torch.testing.assert_close(tensor, before[name] + 0.02, rtol=0, atol=1e-6)


def test_update_clipping_bounds_each_delta(server, tiny_model_dir):
    job = server.create_job(tiny_model_dir, {"copies_m": 2, "rounds_R": 1, "clip_update_norm": 0.5, "alpha_max": 1.0})
    worker = server.worker(server.token(job))
    for _ in range(2):
        lease_id, _, copy = lease_and_download(worker, server)
        delta = {n: torch.ones(t.shape) for n, t in copy.items()}
        worker.put(f"/v1/work/leases/{lease_id}/delta", content=save(delta))
    status = server.admin.get(f"/v1/jobs/{job}").json()
    with SafetensorsFile(f"{status['output_dir']}/model.safetensors") as merged:
        before = load_file(tiny_model_dir / "model.safetensors")
        change = sum((merged.read(n).double() - t.double()).pow(2).sum().item() for n, t in before.items()) ** 0.5
    assert abs(change - 0.5) < 1e-4  # both deltas clipped to norm 0.5, α = 1: their mean has norm 0.5


def test_a_job_without_noise_publishes_theta_and_merges(server, tiny_model_dir):
    # κ = 0 is PUM without noise, the control for the rounds and the merge: no z̄ is written,
    # so publishing must not look for one (it once answered 500 here).
    job = server.create_job(tiny_model_dir, {"copies_m": 2, "rounds_R": 1, "noise_kappa": 0.0})
    worker = server.worker(server.token(job))
    theta = load_file(tiny_model_dir / "model.safetensors")
    for _ in range(2):
        lease_id, _, copy = lease_and_download(worker, server)
        for name, tensor in theta.items():
            assert torch.equal(copy[name], tensor), f"{name} was perturbed with κ = 0"
        delta = {n: torch.full(t.shape, 0.01) for n, t in copy.items()}
        assert worker.put(f"/v1/work/leases/{lease_id}/delta", content=save(delta)).json()["accepted"]
    status = server.admin.get(f"/v1/jobs/{job}").json()
    assert status["state"] == "finalized"
    merged = load_file(f"{status['output_dir']}/model.safetensors")
    for name, before in theta.items():
        torch.testing.assert_close(merged[name], before + 0.01, rtol=0, atol=1e-6)
    report = server.admin.get(f"/v1/jobs/{job}/privacy")
    assert report.status_code == 200 and not report.json()["meaningful"]
    assert any("without Gaussian noise" in w for w in report.json()["no_epsilon_reasons"])
