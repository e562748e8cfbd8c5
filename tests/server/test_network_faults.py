"""Cut downloads resume from the seeds (HTTP Range); stalled uploads time out and leave no trace."""

from __future__ import annotations

import asyncio

import httpx
import pytest
import torch
from safetensors.torch import load, save

from pum.client.api import WorkerAPI
from pum.common.errors import RequestTimeout
from pum.common.schemas import UploadKind


def leased(server, tiny_model_dir, **pum):
    job = server.create_job(tiny_model_dir, {"copies_m": 2, **pum})
    token = server.token(job)
    worker = server.worker(token)
    return job, token, worker, worker.post("/v1/work/lease").json()["lease_id"]


def test_range_requests_return_the_same_bytes(server, tiny_model_dir):
    _, _, worker, lease = leased(server, tiny_model_dir)
    full = worker.get(f"/v1/work/leases/{lease}/copy")
    assert full.status_code == 200 and full.headers["accept-ranges"] == "bytes"
    body = full.content
    for start in (1, 7, 200, len(body) // 2, len(body) - 1):
        part = worker.get(f"/v1/work/leases/{lease}/copy", headers={"Range": f"bytes={start}-"})
        assert part.status_code == 206
        assert part.headers["content-range"] == f"bytes {start}-{len(body) - 1}/{len(body)}"
        assert part.content == body[start:]
    assert worker.get(f"/v1/work/leases/{lease}/copy", headers={"Range": f"bytes={len(body)}-"}).status_code == 416
    bad = worker.get(f"/v1/work/leases/{lease}/copy", headers={"Range": "bytes=0-10"})
    assert bad.status_code == 400 and "bytes=N-" in bad.json()["detail"]


class _CutStream(httpx.SyncByteStream):
    def __init__(self, body: bytes, cut: int, request: httpx.Request):
        self.body, self.cut, self.request = body, cut, request

    def __iter__(self):
        yield self.body[: self.cut]
        raise httpx.ReadError("connection reset by peer", request=self.request)


class CuttingTransport(httpx.BaseTransport):
    """Passes requests to the app, but cuts the first copy download after `cut` bytes."""

    def __init__(self, inner: httpx.BaseTransport, cut: int):
        self.inner, self.cut, self.ranges = inner, cut, []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        inner = self.inner.handle_request(request)
        body = inner.read()  # re-wrapped: the test client's own stream type is not httpx's
        if request.url.path.endswith("/copy"):
            self.ranges.append(request.headers.get("range"))
            if len(self.ranges) == 1:
                return httpx.Response(inner.status_code, headers=inner.headers, stream=_CutStream(body, self.cut, request))
        return httpx.Response(inner.status_code, headers=inner.headers, content=body)


def test_worker_resumes_a_cut_download(server, tiny_model_dir, tmp_path):
    _, token, worker, lease = leased(server, tiny_model_dir)
    expected = worker.get(f"/v1/work/leases/{lease}/copy").content
    transport = CuttingTransport(worker._transport, cut=len(expected) // 3)
    http = httpx.Client(transport=transport, base_url=str(worker.base_url), headers={"Authorization": f"Bearer {token}"})
    sleeps = []
    path = WorkerAPI(http, sleep=sleeps.append).download_copy(lease, tmp_path / "copy.safetensors")
    assert path.read_bytes() == expected
    assert transport.ranges == [None, f"bytes={len(expected) // 3}-"] and sleeps == [1.0]


def test_a_stalled_upload_times_out_and_changes_nothing(tmp_path, tiny_model_dir, server_factory):
    server = server_factory(tmp_path, upload_idle_timeout_s=0.2)
    job, token, worker, lease = leased(server, tiny_model_dir)
    copy = load(worker.get(f"/v1/work/leases/{lease}/copy").content)
    body = save({n: torch.zeros(t.shape) for n, t in copy.items()})

    async def stalls():
        yield body[:100]
        await asyncio.sleep(5)
        yield body[100:]

    with pytest.raises(RequestTimeout, match="stalled"):
        asyncio.run(server.service.uploads.receive(token, lease, UploadKind.DELTA, stalls(), len(body)))
    assert not list(server.settings.state_dir.glob("jobs/*/rounds/*/*upload_*"))
    rnd = server.service.store.round(job, 1)
    assert (rnd.accepted, rnd.s0, rnd.s1_file) == (0, 0.0, None)
    assert worker.put(f"/v1/work/leases/{lease}/delta", content=body).status_code == 200  # the lease lives on


def test_a_copy_can_be_streamed_to_a_device(server, tiny_model_dir):
    """Counting received bytes, not the file's size, lets a benchmark discard the copy in /dev/null."""
    import os
    from pathlib import Path

    _, _, worker, lease = leased(server, tiny_model_dir)
    counted = []
    assert WorkerAPI(worker).download_copy(lease, Path(os.devnull), counted.append) == Path(os.devnull)
    assert sum(counted) == len(worker.get(f"/v1/work/leases/{lease}/copy").content)
