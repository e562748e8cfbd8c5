"""The merged model is exported sharded like its input, with an index, and loads with from_pretrained."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load, save

from pum.common.codec import TensorInfo
from pum.server.model_io import shard_plan


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                        num_key_value_heads=2, intermediate_size=32, tie_word_embeddings=False))


def finish(server, job: str, m: int = 2) -> None:
    worker = server.worker(server.token(job))
    for _ in range(m):
        lease = worker.post("/v1/work/lease").json()["lease_id"]
        copy = load(worker.get(f"/v1/work/leases/{lease}/copy").content)
        assert worker.put(f"/v1/work/leases/{lease}/delta", content=save({n: torch.full(t.shape, 1e-3) for n, t in copy.items()})).status_code == 200
    assert server.admin.get(f"/v1/jobs/{job}").json()["state"] == "finalized"


def test_shard_plan_keeps_the_order_and_the_cap():
    infos = [TensorInfo(f"t{i}", "F32", (n,)) for i, n in enumerate([10, 10, 30, 5, 5])]
    plan = shard_plan(infos, shard_bytes=80)
    assert [[i.name for i in shard] for shard in plan] == [["t0", "t1"], ["t2"], ["t3", "t4"]]
    assert shard_plan(infos, shard_bytes=10**9) == [infos]


def test_a_sharded_input_is_exported_sharded_and_loads(server, tmp_path, as_a_download):
    from transformers import LlamaForCausalLM

    source = as_a_download(tmp_path / "model", tiny_llama(), shard_bytes=4096)
    shards_in = json.loads((source / "model.safetensors.index.json").read_text())["weight_map"]
    saves = server.settings.saves_dir / "t1"
    saves.mkdir(parents=True)
    (saves / "model.safetensors").write_bytes(b"stale: an earlier export")  # must not survive beside the shards
    job = server.create_job(source, {"copies_m": 2, "rounds_R": 1})
    finish(server, job)

    index = json.loads((saves / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and sorted(p.name for p in saves.glob("model*.safetensors")) == files
    assert set(index["weight_map"]) == set(shards_in)
    def data_bytes(folder, weight_map) -> list[int]:
        sizes = {}
        with torch.no_grad():
            for name, file in weight_map.items():
                sizes[file] = sizes.get(file, 0) + load((folder / file).read_bytes())[name].float().numel() * 4
        return list(sizes.values())

    assert max(data_bytes(saves, index["weight_map"])) <= max(data_bytes(source, shards_in))
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in tiny_llama().state_dict().values())
    merged = LlamaForCausalLM.from_pretrained(saves)
    original = tiny_llama().state_dict()
    for name, tensor in merged.state_dict().items():
        assert torch.allclose(tensor, original[name], atol=1e-2), name


def test_a_single_file_input_is_exported_as_one_file_and_a_stale_index_is_removed(server, tmp_path, tiny_model_dir):
    saves = server.settings.saves_dir / "t1"
    saves.mkdir(parents=True)
    (saves / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "model-00001-of-00002.safetensors"}}))
    (saves / "model-00001-of-00002.safetensors").write_bytes(b"stale")
    job = server.create_job(tiny_model_dir, {"copies_m": 2, "rounds_R": 1})
    finish(server, job)
    assert sorted(p.name for p in saves.glob("model*")) == ["model.safetensors"]
