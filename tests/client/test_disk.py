"""The worker checks its temporary folder's free space before the first byte of a copy arrives."""

from __future__ import annotations

import json
import logging
import shutil
from collections import namedtuple

import pytest

from pum.client import disk
from pum.client.api import WorkerAPI
from pum.client.disk import NotEnoughSpace, check_free_space, copy_bytes_needed, served_element_bytes
from pum.client.worker import Worker, WorkerOptions

Usage = namedtuple("Usage", "total used free")


@pytest.mark.parametrize("config, expected", [({"dtype": "bfloat16"}, 2), ({"torch_dtype": "float32"}, 4),
                                              ({"dtype": "float16"}, 2), ({}, 2), ({"dtype": "int4"}, 2)])
def test_the_element_size_comes_from_the_served_config(tmp_path, config, expected):
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert served_element_bytes(tmp_path) == expected


def test_a_copy_needs_room_for_itself_and_its_float32_delta():
    assert copy_bytes_needed(13_500, 2) == 13_500 + 27_000  # bf16: Δ is twice the copy
    assert copy_bytes_needed(4_000, 4) == 8_000


def test_too_little_space_is_refused_naming_both_numbers(tmp_path, monkeypatch):
    monkeypatch.setattr(disk.shutil, "disk_usage", lambda path: Usage(10**9, 10**9 - 1234, 1234))
    with pytest.raises(NotEnoughSpace, match=r"needs 5,000 bytes in .*, which has 1,234 available.*TMPDIR"):
        check_free_space(tmp_path, 5000, "a copy")
    check_free_space(tmp_path, 1234, "a copy")  # exactly enough is enough


def test_the_worker_gives_the_copy_back_before_downloading_it_when_the_disk_is_too_small(
        server, model_dir, forget_pairs, retain_pairs, tmp_path, monkeypatch, caplog):
    job = server.create_job(model_dir, {"copies_m": 2, "rounds_R": 1, "inner_handler": "GradDiff", "local_max_steps": 1})
    real_usage = shutil.disk_usage
    monkeypatch.setattr(disk.shutil, "disk_usage", lambda path: real_usage(path)._replace(free=1000))
    received = []
    api = WorkerAPI(server.worker(server.token(job)))
    worker = Worker(api, forget_pairs, retain_pairs, WorkerOptions(saves_dir=tmp_path / "saves", progress=False),
                    sleep=lambda s: None)
    download = api.download_copy
    api.download_copy = lambda *args, **kwargs: download(*args[:2], received.append, *args[3:], **kwargs)
    with caplog.at_level(logging.WARNING), pytest.raises(RuntimeError, match="3 copies failed in a row"):
        worker.run()
    assert received == []  # not one byte of a copy was written
    assert "which has 1,000 available" in caplog.text and "float32 Δ (4-byte weights)" in caplog.text
    copies = server.admin.get(f"/v1/jobs/{job}").json()["rounds"][0]["copies"]
    assert [c["state"] for c in copies] == ["pending", "pending"]  # given back, offered again
