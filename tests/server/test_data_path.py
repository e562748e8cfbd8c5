"""The upload → accept → step data path: disk traffic, upload kinds, free space, overflow, one
upload per lease, the header cap, a full disk during the step."""

from __future__ import annotations

import asyncio
import errno
import os
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load, save

from pum.common.codec import build_header
from pum.common.errors import Conflict, InvalidInput
from pum.common.schemas import UploadKind
from pum.server.blobs import Faults

ENOSPC = OSError(errno.ENOSPC, "No space left on device")


def save_llama(path: Path, dtype: torch.dtype = torch.float32, vocab: int = 64, hidden: int = 16) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, intermediate_size=2 * hidden, tie_word_embeddings=False)
    LlamaForCausalLM(config).to(dtype).save_pretrained(path)
    return path


def leased_copy(worker: TestClient) -> tuple[str, dict[str, torch.Tensor]]:
    lease = worker.post("/v1/work/lease").json()["lease_id"]
    return lease, load(worker.get(f"/v1/work/leases/{lease}/copy").content)


def put(worker: TestClient, lease: str, body, kind: str | None = None):
    query = f"?kind={kind}" if kind else ""
    return worker.put(f"/v1/work/leases/{lease}/delta{query}", content=body)


async def pieces(body: bytes, size: int = 1024):
    """The body as it arrives from a streaming client without a Content-Length."""
    for start in range(0, len(body), size):
        yield body[start:start + size]


def unsafe(server, worker: TestClient) -> TestClient:
    return TestClient(server.admin.app, headers=dict(worker.headers), raise_server_exceptions=False)


def io_counters() -> dict[str, int]:
    return {k: int(v) for k, v in (line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())}


def evict(path: Path) -> None:
    """Drop a synced file's pages from the page cache, so reading it again reads the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


# ---- What it must show 3: at most 2× the upload size of disk I/O per accepted copy ----------------
@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs Linux's per-process I/O counters")
def test_an_accepted_copy_costs_one_write_and_one_read_of_its_upload(tmp_path, server_factory):
    server = server_factory(tmp_path)
    model = save_llama(tmp_path / "model", vocab=2048, hidden=128)  # ≈ 2.6 MB float32 uploads
    m = 3
    job = server.create_job(model, {"copies_m": m, "rounds_R": 1, "auto_advance": False})
    worker = server.worker(server.token(job))
    bodies = []
    for _ in range(m):
        lease, copy = leased_copy(worker)
        bodies.append((lease, save({n: torch.full(t.shape, 1e-3) for n, t in copy.items()})))
    upload_size = len(bodies[0][1])
    written = []
    for lease, body in bodies:
        before = io_counters()
        assert put(worker, lease, body).status_code == 200
        written.append(io_counters()["write_bytes"] - before["write_bytes"])
    round_dir = tmp_path / "state" / "jobs" / job / "rounds" / "r1"
    kept = sorted(round_dir.glob("upload_*"))
    assert len(kept) == m
    for path in kept:
        evict(path)
    before = io_counters()
    assert server.admin.post(f"/v1/jobs/{job}/advance").status_code == 200
    read = io_counters()["read_bytes"] - before["read_bytes"]
    per_copy = max(written) + read / m
    print(f"upload {upload_size} B; written per accept {written}; read at the step {read} B; "
          f"per accepted copy {per_copy / upload_size:.3f}× the upload")
    assert read >= m * upload_size * 0.95  # the step did read the uploads from disk (the measure works)
    assert max(written) <= upload_size * 1.05 + 64 * 1024  # one write of the upload (+ the store's pages)
    assert per_copy <= 2 * upload_size * 1.05 + 64 * 1024



class CountedReads:
    """A blob opened for reading that adds the bytes read to `counts[its key]`."""

    def __init__(self, stream, counts: dict[str, int]):
        self._stream, self._counts = stream, counts
        counts.setdefault(stream.name, 0)

    def read(self, size: int = -1) -> bytes:
        data = self._stream.read(size)
        self._counts[self._stream.name] += len(data)
        return data

    def readinto(self, buffer) -> int:
        n = self._stream.readinto(buffer)
        self._counts[self._stream.name] += n
        return n

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._stream.close()

    def __getattr__(self, name):
        return getattr(self._stream, name)


@pytest.mark.parametrize("kind", [UploadKind.DELTA, UploadKind.TRAINED])
def test_with_update_clipping_the_step_still_reads_each_upload_once(tmp_path, server_factory, monkeypatch, kind):
    """The clipping norms are taken on receipt (kept in the store with the copy), not by a second
    read at the step; counted at the blob seam, which a page cache cannot hide."""
    pum = {"copies_m": 2, "rounds_R": 2, "auto_advance": False, "noise_kappa": 0.05,
           "clip_update_norm": 1e-3, "clip_update_norm_per_layer": 5e-4}
    merged = {}
    for taken_on_receipt in (True, False):
        server = server_factory(tmp_path / str(taken_on_receipt), backend="memory")
        store = server.service.store
        if not taken_on_receipt:  # as an older server accepted uploads: without their norms
            accept = store.accept_copy
            monkeypatch.setattr(store, "accept_copy", lambda lease, s0, name, sums=None: accept(lease, s0, name))
        job = server.create_job(save_llama(tmp_path / "model"), pum)
        worker = server.worker(server.token(job))
        for _ in range(2):
            lease, copy = leased_copy(worker)
            update = {n: t + 1e-3 if kind is UploadKind.TRAINED else torch.full(t.shape, 1e-3) for n, t in copy.items()}
            assert put(worker, lease, save(update), kind=kind.value).status_code == 200
        assert all((c.update_sums is not None) == taken_on_receipt for c in store.copies(job, 1))
        blobs, read = server.service.context.blobs, {}
        folder = f"jobs/{job}/rounds/r1"
        uploads = {f"{folder}/{name}": blobs.size(f"{folder}/{name}") for name in blobs.list(folder) if name.startswith("upload_")}
        opened = blobs.open
        monkeypatch.setattr(blobs, "open", lambda key: CountedReads(opened(key), read))
        assert server.admin.post(f"/v1/jobs/{job}/advance").status_code == 200
        assert len(uploads) == 2 and set(uploads) <= set(read)
        times = 1 if taken_on_receipt else 2
        for key, size in uploads.items():
            assert (times - 0.5) * size <= read[key] <= times * size, (key, read[key], size)  # tensors, header once
        merged[taken_on_receipt] = server.blob(job, "theta_r2.safetensors")
    for name, tensor in merged[True].items():  # the same clipping either way, bit for bit
        assert torch.equal(tensor, merged[False][name]), name

# ---- What it must show 2: a bf16 model's upload is its bf16 size and merges like the float32 delta --
@pytest.mark.parametrize("reparam", [False, True])
def test_a_bf16_trained_upload_merges_like_the_float32_delta(tmp_path, server_factory, reparam):
    model = save_llama(tmp_path / "model", torch.bfloat16)
    pum = {"copies_m": 2, "rounds_R": 1, "noise_kappa": 0.05, "use_orthogonal_reparam": reparam}

    def run(kind: UploadKind, where: str) -> tuple[dict[str, torch.Tensor], list[int]]:
        server = server_factory(tmp_path / where)
        job = server.create_job(model, pum)
        worker = server.worker(server.token(job))
        sizes = []
        for _ in range(2):
            lease, copy = leased_copy(worker)
            # a worker that trained in bf16: its trained weights are bf16 numbers
            trained = {n: (t.float() * 0.99 - 1e-3).to(torch.bfloat16) for n, t in copy.items()}
            if kind is UploadKind.TRAINED:
                body = save(trained)
            else:
                body = save({n: trained[n].float() - t.float() for n, t in copy.items()})
            sizes.append(len(body))
            assert put(worker, lease, body, kind.value).status_code == 200
        assert server.admin.get(f"/v1/jobs/{job}").json()["state"] == "finalized"
        return load(server.admin.get(f"/v1/jobs/{job}/model/model.safetensors").content), sizes

    via_delta, delta_sizes = run(UploadKind.DELTA, "delta")
    via_trained, trained_sizes = run(UploadKind.TRAINED, "trained")
    bf16_bytes = sum(t.numel() * 2 for t in via_delta.values())
    assert all(size - bf16_bytes < 8192 for size in trained_sizes)  # the model's bf16 size (+ its header)
    assert all(size > 1.9 * bf16_bytes for size in delta_sizes)
    for name, tensor in via_delta.items():
        assert via_trained[name].dtype == torch.bfloat16
        torch.testing.assert_close(via_trained[name].float(), tensor.float(), rtol=1e-6, atol=0, msg=name)


def test_an_upload_of_the_wrong_kind_is_refused(tmp_path, server_factory):
    server = server_factory(tmp_path)
    job = server.create_job(save_llama(tmp_path / "model", torch.bfloat16), {"copies_m": 2, "rounds_R": 1})
    worker = server.worker(server.token(job))
    lease, copy = leased_copy(worker)
    as_float32 = save({n: t.float() for n, t in copy.items()})
    refused = put(worker, lease, as_float32, "trained")
    assert refused.status_code == 413 and "trained upload" in refused.json()["detail"]
    assert put(worker, lease, as_float32, "weights").status_code == 400  # not a kind
    assert put(worker, lease, save(copy), "trained").status_code == 200


# ---- free space ------------------------------------------------------------------------------
def test_no_space_for_an_upload_is_507_naming_the_bytes(tmp_path, server_factory):
    server = server_factory(tmp_path, backend="memory")
    job = server.create_job(save_llama(tmp_path / "model"), {"copies_m": 2, "rounds_R": 1})
    worker = server.worker(server.token(job))
    lease, copy = leased_copy(worker)
    blobs = server.service.context.blobs
    blobs.capacity = sum(map(len, blobs.blobs.values())) + 1000  # 1000 bytes left
    refused = put(unsafe(server, worker), lease, save({n: torch.zeros(t.shape) for n, t in copy.items()}))
    assert refused.status_code == 507, refused.text
    assert "1000 free" in refused.json()["detail"] and "needs" in refused.json()["detail"]
    assert server.service.store.round(job, 1).accepted == 0
    blobs.capacity = None
    assert put(worker, lease, save({n: torch.zeros(t.shape) for n, t in copy.items()})).status_code == 200


def test_no_space_for_a_job_or_a_round_is_507_before_anything_is_written(tmp_path, server_factory):
    server = server_factory(tmp_path, backend="memory")
    blobs = server.service.context.blobs
    blobs.capacity = 1000
    body = {"task": "t1", "model_dir": str(save_llama(tmp_path / "model")), "pum": {"seed": 7}, "hyperparams": {}}
    refused = server.admin.post("/v1/jobs", json=body)
    assert refused.status_code == 507 and "1000 free" in refused.json()["detail"], refused.text
    assert blobs.blobs == {} and server.service.store.jobs() == []
    blobs.capacity = None
    job = server.create_job(tmp_path / "model", start=False)
    blobs.capacity = sum(map(len, blobs.blobs.values())) + 10  # θ is in; no room for round 1's z̄
    refused = server.admin.post(f"/v1/jobs/{job}/start")
    assert refused.status_code == 507 and "round 1" in refused.json()["detail"], refused.text
    assert server.service.store.job(job).state == "created"
    blobs.capacity = None
    assert server.admin.post(f"/v1/jobs/{job}/start").status_code == 200


@pytest.mark.parametrize("backend", ["sqlite", "memory"])
def test_a_full_disk_during_the_step_keeps_the_round_and_resume_retries(tmp_path, server_factory, backend):
    faults = Faults()
    server = server_factory(tmp_path, backend=backend, faults=faults)
    job = server.create_job(save_llama(tmp_path / "model"), {"copies_m": 2, "rounds_R": 2})
    worker = server.worker(server.token(job))
    faults.fail("write", ENOSPC, key=f"jobs/{job}/theta_r2.safetensors")
    for _ in range(2):
        lease, copy = leased_copy(worker)
        assert put(worker, lease, save({n: torch.full(t.shape, 1e-3) for n, t in copy.items()})).status_code == 200
    status = server.admin.get(f"/v1/jobs/{job}").json()
    assert (status["state"], status["round"], status["rounds"][0]["accepted"]) == ("paused", 1, 2)
    assert "step deferred" in status["error"]
    files = server.service.context.files(job)
    assert not files.exists(files.theta(2)) and len([n for n in files.list("rounds/r1") if "upload" in n]) == 2
    assert not list((tmp_path / "state").rglob(".*.tmp"))  # no partial θ

    faults.fail("write", ENOSPC, key=f"jobs/{job}/theta_r2.safetensors")
    again = server.admin.post(f"/v1/jobs/{job}/resume")
    assert again.status_code == 507 and "resume" in again.json()["detail"]
    assert server.admin.get(f"/v1/jobs/{job}").json()["state"] == "paused"
    resumed = server.admin.post(f"/v1/jobs/{job}/resume")
    assert resumed.status_code == 200, resumed.text
    assert (resumed.json()["state"], resumed.json()["round"]) == ("running", 2)



def test_no_space_to_save_the_merged_model_pauses_the_job_before_writing_and_resume_saves_it(tmp_path, server_factory):
    """The saves folder may be another disk: the export checks it (bytes named) before its first write."""
    server = server_factory(tmp_path, backend="memory")
    job = server.create_job(save_llama(tmp_path / "model"), {"copies_m": 2, "rounds_R": 1}, task="full")
    worker = server.worker(server.token(job))
    saves = server.service.context.saves
    saves.capacity = 1000
    for _ in range(2):
        lease, copy = leased_copy(worker)
        assert put(worker, lease, save({n: torch.full(t.shape, 1e-3) for n, t in copy.items()})).status_code == 200
    status = server.admin.get(f"/v1/jobs/{job}").json()
    assert status["state"] == "paused" and status["output_dir"] is None, status
    assert "saving the merged model" in status["error"] and "1000 free" in status["error"], status["error"]
    assert saves.blobs == {}  # not one file of the model was written
    saves.capacity = None
    resumed = server.admin.post(f"/v1/jobs/{job}/resume")
    assert resumed.status_code == 200, resumed.text
    status = server.admin.get(f"/v1/jobs/{job}").json()
    assert status["state"] == "finalized" and "full/model.safetensors" in saves.blobs, status

# ---- overflow --------------------------------------------------------------------------------
def test_huge_finite_updates_are_refused_and_theta_stays_finite(tmp_path, server_factory):
    server = server_factory(tmp_path)
    job = server.create_job(save_llama(tmp_path / "model"), {"copies_m": 2, "rounds_R": 1})
    worker = server.worker(server.token(job))
    for _ in range(2):
        lease, copy = leased_copy(worker)
        refused = put(worker, lease, save({n: torch.full(t.shape, 3e38) for n, t in copy.items()}))
        assert refused.status_code == 400 and "magnitude" in refused.json()["detail"]
        assert put(worker, lease, save({n: torch.full(t.shape, 1e-3) for n, t in copy.items()})).status_code == 200
    merged = load(server.admin.get(f"/v1/jobs/{job}/model/model.safetensors").content)
    assert all(torch.isfinite(t).all() for t in merged.values())


# ---- one upload per lease, the header cap, small __metadata__ --------------------------------
def test_a_second_upload_for_the_same_lease_is_409_while_the_first_is_in_flight(tmp_path, server_factory):
    server = server_factory(tmp_path)
    job = server.create_job(save_llama(tmp_path / "model"), {"copies_m": 2, "rounds_R": 1})
    token = server.token(job)
    lease, copy = leased_copy(server.worker(token))
    body = save({n: torch.full(t.shape, 1e-3) for n, t in copy.items()})
    uploads = server.service.uploads

    async def both():
        first_started, second_done = asyncio.Event(), asyncio.Event()

        async def slow_body():
            yield body[:100]
            first_started.set()
            await second_done.wait()
            yield body[100:]

        first = asyncio.create_task(uploads.upload(token, lease, UploadKind.DELTA, slow_body(), len(body)))
        await first_started.wait()

        async def whole():
            yield body

        with pytest.raises(Conflict, match="already in progress"):
            await uploads.upload(token, lease, UploadKind.DELTA, whole(), len(body))
        second_done.set()
        return await first

    assert asyncio.run(both()).accepted
    assert server.service.store.round(job, 1).accepted == 1


def test_a_header_over_the_expected_size_is_refused_before_it_is_buffered(tmp_path, server_factory):
    server = server_factory(tmp_path)
    job = server.create_job(save_llama(tmp_path / "model"), {"copies_m": 2, "rounds_R": 1})
    worker = server.worker(server.token(job))
    token = server.token(job)
    lease, copy = leased_copy(server.worker(token))
    padded = save({n: torch.zeros(t.shape) for n, t in copy.items()}, metadata={"pad": "x" * 100_000})
    expected = len(build_header(server.service.uploads.layout(job, 1)))
    with pytest.raises(InvalidInput, match=f"header declares .* over the limit of {expected + 4096}:"):
        asyncio.run(server.service.uploads.upload(token, lease, UploadKind.DELTA, pieces(padded), None))


def test_a_delta_with_a_small_metadata_is_accepted(tmp_path, server_factory):
    server = server_factory(tmp_path)
    job = server.create_job(save_llama(tmp_path / "model"), {"copies_m": 2, "rounds_R": 1})
    worker = server.worker(server.token(job))
    lease, copy = leased_copy(worker)
    body = save({n: torch.zeros(t.shape) for n, t in copy.items()}, metadata={"format": "pt"})
    assert put(worker, lease, body).status_code == 200


# ---- the noise device --------------------------------------------------------------------------
def test_a_job_keeps_the_device_its_noise_is_drawn_on(tmp_path, server_factory):
    server = server_factory(tmp_path, device="cpu")
    job = server.create_job(save_llama(tmp_path / "model"), {"copies_m": 2, "rounds_R": 1})
    assert server.service.store.job(job).spec.device == "cpu"
    worker = server.worker(server.token(job))
    lease = worker.post("/v1/work/lease").json()["lease_id"]
    first = worker.get(f"/v1/work/leases/{lease}/copy").content
    resumed = worker.get(f"/v1/work/leases/{lease}/copy", headers={"Range": f"bytes={len(first) // 2}-"}).content
    assert resumed == first[len(first) // 2:]  # the same bytes, regenerated on the job's device


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusals of a machine without CUDA")
def test_a_cuda_device_is_refused_clearly_without_cuda():
    from pydantic import ValidationError

    from pum.cli import main
    from pum.server.config import ServerSettings
    from pum.server.rounds import noise_device

    assert main(["server", "--dev", "--device", "cuda"]) != 0  # refused at start-up, before serving

    with pytest.raises(ValidationError):
        ServerSettings(dev_mode=True, device="tpu")
    with pytest.raises(Conflict, match="fixed per job"):
        noise_device("cuda:0")  # a job created on a GPU server, resumed on one without
    assert noise_device("cpu") == "cpu"


def test_a_restart_keeps_the_accepted_uploads_and_removes_the_others(tmp_path, server_factory):
    first = server_factory(tmp_path)
    job = first.create_job(save_llama(tmp_path / "model"), {"copies_m": 3, "rounds_R": 1})
    token = first.token(job)
    worker = first.worker(token)
    for _ in range(2):
        lease, copy = leased_copy(worker)
        assert put(worker, lease, save({n: torch.full(t.shape, 1e-3) for n, t in copy.items()})).status_code == 200
    lease, copy = leased_copy(worker)
    files = first.service.context.files(job)
    # written, never accepted: the server died between the upload's last byte and its acceptance
    files.blobs.write_bytes(f"{files.root}/{files.upload(1, lease)}", b"never accepted")
    first.service.store.close()

    second = server_factory(tmp_path)
    kept = [n for n in second.service.context.files(job).list("rounds/r1") if n.startswith("upload_")]
    assert len(kept) == 2 and f"upload_{lease}.safetensors" not in kept
    body = save({n: torch.full(t.shape, 1e-3) for n, t in copy.items()})
    assert put(second.worker(token), lease, body).status_code == 200  # the same lease uploads again, and counts
    assert second.admin.get(f"/v1/jobs/{job}").json()["state"] == "finalized"
