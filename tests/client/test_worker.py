"""The real worker loop against the in-process server, and the client's network behaviour."""

from __future__ import annotations

import json

import httpx
import pytest
import torch

from pum.client.api import WorkerAPI
from pum.client.worker import Worker, WorkerOptions
from pum.common.schemas import UploadAccepted, UploadKind
from pum.common.states import JobState


def run_worker(server, job, forget, retain, tmp_path, **options) -> Worker:
    api = WorkerAPI(server.worker(server.token(job)))
    worker = Worker(api, forget, retain, WorkerOptions(saves_dir=tmp_path / "saves", progress=False, **options),
                    sleep=lambda s: None)
    worker.run()
    return worker


def test_worker_runs_a_job_to_the_end(server, model_dir, forget_pairs, retain_pairs, tmp_path):
    job = server.create_job(model_dir, {"copies_m": 2, "rounds_R": 2, "inner_handler": "GradDiff", "local_max_steps": 2})
    worker = run_worker(server, job, forget_pairs, retain_pairs, tmp_path)
    assert worker.done == 4 and worker.failed == 0
    assert server.admin.get(f"/v1/jobs/{job}").json()["state"] == "finalized"
    folders = sorted(p.name for p in (tmp_path / "saves" / "t1").glob("pum_round*"))
    assert folders == ["pum_round1_copy0", "pum_round1_copy1", "pum_round2_copy0", "pum_round2_copy1"]
    log_lines = (tmp_path / "saves" / "t1" / "pum_round1_copy0" / "train_log.jsonl").read_text().splitlines()
    assert len(log_lines) == 2 and all("loss" in json.loads(line) for line in log_lines)
    metrics = json.loads((tmp_path / "saves" / "t1" / "pum_round2_copy1" / "metrics.json").read_text())
    assert metrics["method"] == "GradDiff" and metrics["train"]["steps"] == 2


def test_a_bf16_delta_worker_uploads_half_the_bytes_and_merges_close_to_float32(
    server_factory, model_dir, forget_pairs, retain_pairs, tmp_path
):
    from safetensors.torch import load, load_file

    class Recording(WorkerAPI):
        def upload_delta(self, lease_id, path, progress=None, kind=UploadKind.DELTA):
            sent.append((kind, path.stat().st_size))
            return super().upload_delta(lease_id, path, progress, kind)

    theta = {n: t.double() for n, t in load_file(model_dir / "model.safetensors").items()}
    updates, sizes = {}, {}
    for bf16 in (False, True):
        sent = []
        server = server_factory(tmp_path / str(bf16))
        job = server.create_job(model_dir, {"copies_m": 2, "rounds_R": 1, "inner_handler": "GradDiff",
                                            "local_max_steps": 2, "noise_kappa": 0.0})
        api = Recording(server.worker(server.token(job)))
        options = WorkerOptions(saves_dir=tmp_path / str(bf16), progress=False, bf16_delta=bf16)
        assert Worker(api, forget_pairs, retain_pairs, options, sleep=lambda s: None).run() == 2
        merged = load(server.admin.get(f"/v1/jobs/{job}/model/model.safetensors").content)
        updates[bf16] = {n: merged[n].double() - theta[n] for n in theta}
        sizes[bf16] = sent
    assert {kind for kind, _ in sizes[True]} == {UploadKind.DELTA_BF16}
    assert {kind for kind, _ in sizes[False]} == {UploadKind.DELTA}
    assert sizes[True][0][1] < 0.51 * sizes[False][0][1]
    error = sum((updates[True][n] - updates[False][n]).pow(2).sum() for n in theta) ** 0.5
    norm = sum(updates[False][n].pow(2).sum() for n in theta) ** 0.5
    assert 0 < norm and error / norm < 1e-2  # bf16 rounding of Δ: ~0.2 % of the update (bench/upload_dtype.py)


def test_a_failing_copy_is_given_back_and_the_worker_stops_after_repeated_failures(
    server, model_dir, forget_pairs, tmp_path
):
    # GradDiff needs a retain set; this worker has none, so every copy fails on the worker's side
    job = server.create_job(model_dir, {"copies_m": 2, "rounds_R": 1, "inner_handler": "GradDiff"})
    with pytest.raises(RuntimeError, match="3 copies failed in a row"):
        run_worker(server, job, forget_pairs, None, tmp_path)
    status = server.admin.get(f"/v1/jobs/{job}").json()
    copies = status["rounds"][0]["copies"]
    assert [c["state"] for c in copies] == ["pending", "pending"]  # offered again
    assert sum(c["failures"] for c in copies) == 3


def test_upload_is_retried_with_backoff_on_transport_errors(tmp_path):
    calls, sleeps = [], []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.read())
        if len(calls) < 3:
            raise httpx.ConnectError("connection refused", request=request)
        return httpx.Response(200, json={"accepted": True, "job_state": "running", "round": 1})

    delta = tmp_path / "delta.safetensors"
    delta.write_bytes(b"x" * 3000)
    api = WorkerAPI(httpx.Client(transport=httpx.MockTransport(handler), base_url="http://server"), sleep=sleeps.append)
    assert api.upload_delta("lease-1", delta) == UploadAccepted(job_state=JobState.RUNNING, round=1)
    assert sleeps == [1.0, 2.0]
    assert all(body == b"x" * 3000 for body in calls)  # each retry re-sends the whole file


def test_server_refusal_becomes_a_pum_error_with_the_message():
    from pum.common.errors import LeaseExpired

    transport = httpx.MockTransport(lambda r: httpx.Response(410, json={"detail": "lease expired: ask for a new lease"}))
    api = WorkerAPI(httpx.Client(transport=transport, base_url="http://server"))
    with pytest.raises(LeaseExpired, match="ask for a new lease"):
        api.heartbeat("lease-1")


class FakeServer:
    """A scripted server behind httpx.MockTransport: one lease reply, files, a copy; records every call."""

    def __init__(self, lease: dict, files: dict[str, httpx.Response], copy: httpx.Response):
        self.lease, self.files, self.copy = lease, files, copy
        self.calls: list[tuple[str, str]] = []
        self.released: list[tuple[str, str]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        self.calls.append((request.method, path))
        if path == "/v1/work/lease":
            return httpx.Response(200, json=self.lease if not self.released else {"status": "done", "job_state": "aborted"})
        if path.startswith("/v1/work/files/"):
            return self.files.get(path.removeprefix("/v1/work/files/"), httpx.Response(404, json={"detail": "no file"}))
        if path.endswith("/copy"):
            return self.copy
        if path.endswith("/release"):
            self.released.append((path.split("/")[-2], json.loads(request.content)["reason"]))
            return httpx.Response(200, json={"released": True})
        if path.endswith("/heartbeat"):
            return httpx.Response(200, json={"ttl_s": 30.0})
        return httpx.Response(404, json={"detail": f"no route {path}"})


def lease_reply(**changes) -> dict:
    return {
        "status": "leased", "lease_id": "lease-1", "job_id": "job-1", "task_name": "t1", "round": 1, "rounds_R": 1,
        "ttl_s": 30.0, "public_files": ["config.json", "tokenizer.json", "tokenizer_config.json"],
        "task": {"method": "GradAscent", "epochs": 1.0, "max_steps": 1, "rounds": 1, "hyperparams": {}},
        **changes,
    }


def served(model_dir) -> dict[str, httpx.Response]:
    return {p.name: httpx.Response(200, content=p.read_bytes()) for p in model_dir.iterdir() if p.suffix == ".json"}


@pytest.mark.parametrize("case", ["server refuses a file", "copy cut short", "unsafe name", "code in config"])
def test_a_worker_that_gives_up_on_a_copy_always_releases_its_lease(case, model_dir, forget_pairs, tmp_path):
    files = served(model_dir)
    copy_bytes = (model_dir / "model.safetensors").read_bytes()
    copy = httpx.Response(200, content=copy_bytes)
    lease = lease_reply()
    if case == "server refuses a file":  # a PumError (404) on the worker's side
        files.pop("tokenizer.json")
    elif case == "copy cut short":
        copy = httpx.Response(200, content=copy_bytes[:100], headers={"content-length": str(len(copy_bytes))})
    elif case == "unsafe name":
        lease = lease_reply(public_files=["config.json", "../../.bashrc"])
    else:
        config = json.loads(files["config.json"].content)
        files["config.json"] = httpx.Response(200, json={**config, "auto_map": {"AutoConfig": "evil.C"}})
    fake = FakeServer(lease, files, copy)
    api = WorkerAPI(httpx.Client(transport=httpx.MockTransport(fake), base_url="http://server"), sleep=lambda s: None)
    worker = Worker(api, forget_pairs, None, WorkerOptions(saves_dir=tmp_path / "saves", progress=False), sleep=lambda s: None)
    worker.run()
    assert worker.failed == 1 and worker.done == 0
    assert [lease_id for lease_id, _ in fake.released] == ["lease-1"]
    assert fake.released[0][1]  # with a reason
    assert not (tmp_path / "saves").exists()  # nothing written for a copy that never started


def test_public_files_are_bounded_by_their_announced_size_and_the_limit(tmp_path):
    def handler(request: httpx.Request) -> httpx.Response:
        name = request.url.path.rsplit("/", 1)[-1]
        if name == "liar":  # announces 10 bytes, sends 1000
            return httpx.Response(200, stream=httpx.ByteStream(b"x" * 1000), headers={"content-length": "10"})
        if name == "unannounced":  # chunked, no length
            return httpx.Response(200, content=iter([b"x" * 600, b"x" * 600]))
        return httpx.Response(200, content=b"x" * 2000)

    api = WorkerAPI(httpx.Client(transport=httpx.MockTransport(handler), base_url="http://server"))
    from pum.common.errors import InvalidInput

    for name in ("liar", "unannounced", "big"):
        with pytest.raises(InvalidInput, match="bytes"):
            api.public_file(name, tmp_path / name, max_bytes=1000)
    assert api.public_file("fine", tmp_path / "fine", max_bytes=4096).read_bytes() == b"x" * 2000


def test_a_copy_without_an_announced_size_or_longer_than_announced_is_refused(tmp_path):
    from pum.common.errors import InvalidInput

    replies = {
        "chunked": lambda: httpx.Response(200, content=iter([b"x" * 100])),
        "liar": lambda: httpx.Response(200, stream=httpx.ByteStream(b"x" * 1000), headers={"content-length": "10"}),
    }
    for name, reply in replies.items():
        api = WorkerAPI(httpx.Client(transport=httpx.MockTransport(lambda r: reply()), base_url="http://server"))
        with pytest.raises(InvalidInput):
            api.download_copy("lease-1", tmp_path / name)
        assert (tmp_path / name).stat().st_size <= 10


def test_worker_completes_a_job_on_a_model_folder_as_users_download_it(
    server, make_model, tokenizer, forget_pairs, tmp_path, as_a_download
):
    folder = tmp_path / "downloaded"
    tokenizer.save_pretrained(folder)
    as_a_download(folder, make_model(0), shard_bytes=40_000)
    job = server.create_job(folder, {"copies_m": 2, "rounds_R": 1, "inner_handler": "GradAscent", "local_max_steps": 1})
    worker = run_worker(server, job, forget_pairs, None, tmp_path)
    assert (worker.done, worker.failed) == (2, 0)
    assert server.admin.get(f"/v1/jobs/{job}").json()["state"] == "finalized"


def test_worker_completes_a_job_on_a_gpt_neox_checkpoint_saved_by_current_transformers(
    server, tokenizer, forget_pairs, tmp_path
):
    """transformers 5 saves GPT-NeoX's head as `embed_out.weight` and loads it as `lm_head.weight`."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    folder = tmp_path / "neox"
    torch.manual_seed(0)
    GPTNeoXForCausalLM(GPTNeoXConfig(
        vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
        tie_word_embeddings=False,
    )).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    job = server.create_job(folder, {"copies_m": 2, "rounds_R": 1, "inner_handler": "GradAscent", "local_max_steps": 1})
    worker = run_worker(server, job, forget_pairs, None, tmp_path)
    assert (worker.done, worker.failed) == (2, 0)
    assert server.admin.get(f"/v1/jobs/{job}").json()["state"] == "finalized"
