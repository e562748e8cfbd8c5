"""What the CLI shows while it works: `pum admin wait` progress (and no default timeout), byte bars
with their totals for `pum admin download` and for the worker's download and upload."""

from __future__ import annotations

import io

import httpx
import pytest
from safetensors.torch import load_file

from pum.client.admin import AdminAPI
from pum.client.api import WorkerAPI
from pum.client.progress import WaitProgress, job_progress
from pum.client.worker import Worker, WorkerOptions
from pum.common.schemas import JobStatus


def status(state: str, round_: int, accepted: int, error: str | None = None) -> dict:
    """A job status reply, as the server sends it."""
    rounds = [{"round": r, "state": "open" if r == round_ else "merged", "accepted": accepted if r == round_ else 4,
               "sigmas": {}, "started_at": 0.0, "finished_at": None, "copies": []} for r in range(1, round_ + 1)]
    return {"id": "job-1", "task": "t", "state": state, "round": round_, "created_at": 0.0, "rounds_R": 2,
            "copies_m": 4, "error": error, "output_dir": None, "updated_at": 0.0, "settings": {}, "hyperparams": {},
            "rounds": rounds}


def scripted_admin(statuses: list[dict]) -> tuple[AdminAPI, list[int]]:
    polls = []

    def handler(request: httpx.Request) -> httpx.Response:
        polls.append(1)
        return httpx.Response(200, json=statuses[min(len(polls), len(statuses)) - 1])

    return AdminAPI(httpx.Client(transport=httpx.MockTransport(handler), base_url="http://server")), polls


def test_job_progress_line():
    def line(reply: dict) -> str:
        return job_progress(JobStatus.model_validate(reply))

    assert line(status("running", 2, 3)) == "job job-1 running: round 2/2, copies accepted 3/4"
    assert line(status("created", 0, 0) | {"rounds": []}) == "job job-1 created"
    assert line(status("failed", 1, 1, "merge failed: disk full")).endswith("(merge failed: disk full)")


def test_wait_has_no_default_timeout_and_reports_each_change():
    # 400 polls of a running job (200 s of polling at 0.5 s), then finalized: no timeout stops it.
    statuses = [status("running", 1, k // 100) for k in range(400)] + [status("finalized", 2, 4)]
    admin, polls = scripted_admin(statuses)
    out = io.StringIO()
    final = admin.wait("job-1", sleep=lambda s: None, on_status=WaitProgress(out))
    assert final.state == "finalized" and len(polls) == 401
    assert out.getvalue().splitlines() == [
        "job job-1 running: round 1/2, copies accepted 0/4",
        "job job-1 running: round 1/2, copies accepted 1/4",
        "job job-1 running: round 1/2, copies accepted 2/4",
        "job job-1 running: round 1/2, copies accepted 3/4",
        "job job-1 finalized: round 2/2, copies accepted 4/4",
    ]


def test_wait_with_a_timeout_still_gives_up():
    admin, _ = scripted_admin([status("running", 1, 0)])
    with pytest.raises(TimeoutError, match="still running"):
        admin.wait("job-1", timeout_s=0.0, sleep=lambda s: None)


def test_the_cli_wait_defaults_to_no_timeout():
    from pum.cli import build_parser

    assert build_parser().parse_args(["admin", "wait", "job-1"]).timeout is None


class RecordingBar:
    """Stands in for a tqdm bar: records its total and the bytes it was advanced by."""

    def __init__(self, bars: list, desc: str, total: int | None, enabled: bool = True):
        self.desc, self.total, self.n = desc, total, 0
        bars.append(self)

    def update(self, n: int) -> None:
        self.n += n

    def reset(self, total: int | None = None) -> None:
        self.total, self.n = total, 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_admin_download_bars_know_each_file_size(tmp_path):
    files = {"config.json": b"{}" * 10, "model.safetensors": b"x" * 3_000_000}

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/jobs/job-1/model":
            return httpx.Response(200, json={"files": list(files)})
        return httpx.Response(200, content=files[request.url.path.rsplit("/", 1)[1]])

    bars: list[RecordingBar] = []
    admin = AdminAPI(httpx.Client(transport=httpx.MockTransport(handler), base_url="http://server"))
    admin.download_model("job-1", tmp_path / "out", bars=lambda name, total: RecordingBar(bars, name, total))
    assert [(b.desc, b.total, b.n) for b in bars] == [(n, len(c), len(c)) for n, c in files.items()]
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == files["model.safetensors"]


def test_worker_bars_have_the_copy_and_delta_sizes(server, model_dir, forget_pairs, retain_pairs, tmp_path, monkeypatch):
    import pum.client.worker as worker_module

    bars: list[RecordingBar] = []
    monkeypatch.setattr(worker_module, "byte_bar", lambda desc, total, enabled: RecordingBar(bars, desc, total))
    seen_deltas = []
    real_upload = WorkerAPI.upload_delta

    def upload(self, lease_id, path, progress=None, *kind):
        seen_deltas.append(path.stat().st_size)
        return real_upload(self, lease_id, path, progress, *kind)

    monkeypatch.setattr(WorkerAPI, "upload_delta", upload)
    job = server.create_job(model_dir, {"copies_m": 2, "rounds_R": 1, "inner_handler": "GradDiff", "local_max_steps": 1})
    api = WorkerAPI(server.worker(server.token(job)))
    Worker(api, forget_pairs, retain_pairs, WorkerOptions(saves_dir=tmp_path / "saves"), sleep=lambda s: None).run()
    download, upload_bar = [b for b in bars if b.desc == "download"], [b for b in bars if b.desc == "upload"]
    assert len(download) == 2 and len(upload_bar) == 2
    copy_bytes = sum(t.numel() * t.element_size() for t in load_file(model_dir / "model.safetensors").values())
    for bar in download:
        assert bar.total == bar.n and bar.total > copy_bytes  # the Content-Length: the tensors plus the header
    assert [(b.total, b.n) for b in upload_bar] == [(size, size) for size in seen_deltas]
