"""A model folder as a user gets it, through real `pum server` and `pum worker` processes.

The folder has what a hub download or a git clone brings: weights in shards with an index,
`.gitattributes`, `README.md`, `LICENSE`, an `original/` folder with a pickled checkpoint and a
stale `.bin` index. The job must finish and export a model that `from_pretrained` loads.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from pum.client.admin import AdminAPI
from pum.client.cli import http_client
from pum.demo.assets import tiny_assets
from pum.demo.cluster import LocalServer, start_worker

pytestmark = pytest.mark.e2e


def test_a_downloaded_model_folder_completes_a_job_and_exports_a_loadable_model(tmp_path, as_a_download):
    from transformers import AutoModelForCausalLM

    assets = tiny_assets(tmp_path / "assets")
    folder = tmp_path / "downloaded"
    folder.mkdir()
    for path in assets.model_dir.iterdir():
        if path.name.startswith("tokenizer") or path.name == "special_tokens_map.json":
            shutil.copyfile(path, folder / path.name)
    original = assets.load_model()
    as_a_download(folder, original, shard_bytes=100_000)
    assert len(list(folder.glob("model-*.safetensors"))) > 1

    saves = tmp_path / "saves"
    server = LocalServer(state_dir=tmp_path / "state", saves_dir=saves, log_path=tmp_path / "server.log")
    with server, http_client(server.url, server.admin_token) as http:
        admin = AdminAPI(http)
        pum = {"copies_m": 2, "rounds_R": 1, "noise_kappa": 0.01, "inner_handler": "GradAscent", "local_max_steps": 1}
        job = admin.create_job("downloaded", str(folder), pum, {"lr": 1e-3, "batch_size": 4}).id
        worker = start_worker(server.url, admin.issue_token(job, "w"), assets.split("forget10"), None, saves,
                              log_path=tmp_path / "worker.log")
        admin.action(job, "start")
        try:
            status = admin.wait(job, timeout_s=240, poll_s=0.5)
        finally:
            exit_code = worker.wait(timeout=60)
        logs = "\n".join(p.read_text() for p in tmp_path.glob("*.log"))
        assert status.state == "finalized", logs[-3000:]
        assert exit_code == 0, logs[-3000:]
        assert all(c.failures == 0 for c in status.rounds[0].copies), status
        merged_dir = admin.download_model(job, tmp_path / "merged")

    names = sorted(p.name for p in merged_dir.iterdir())
    shards = [n for n in names if n.startswith("model-")]  # sharded like the input, with its index
    assert len(shards) > 1 and shards[-1].endswith(f"-of-{len(shards):05d}.safetensors")
    assert [n for n in names if n not in shards] == [
        "config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json",
    ]
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, trust_remote_code=False, local_files_only=True)
    assert merged.state_dict().keys() == original.state_dict().keys()
    changed = [n for n, t in merged.state_dict().items() if not torch.equal(t, original.state_dict()[n])]
    assert changed, "the merged model equals the original: no update was applied"
