"""Job creation from model folders as users have them: downloads, clones, caches, older layouts, broken ones."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load, load_file, save, save_file

from pum.server.model_io import public_files


def tiny(kind: str, tie: bool = True):
    """A tiny random model of a real transformers class."""
    from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(
            vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
            intermediate_size=32, tie_word_embeddings=tie,
        ))
    if kind == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=32))
    return GPTNeoXForCausalLM(GPTNeoXConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        tie_word_embeddings=False,
    ))


def tokenizer_files(path, **config) -> None:
    (path / "tokenizer.json").write_text("{}")
    (path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", **config}))


def rewrite_weights(path, change) -> None:
    """Apply `change(tensors) -> tensors` to the single model.safetensors of a folder."""
    tensors = load_file(path / "model.safetensors")
    save_file(change(tensors), path / "model.safetensors", metadata={"format": "pt"})


def a_copy(server, job: str) -> dict[str, torch.Tensor]:
    worker = server.worker(server.token(job))
    lease = worker.post("/v1/work/lease").json()
    return load(worker.get(f"/v1/work/leases/{lease['lease_id']}/copy").content)


def finalize_unchanged(server, job: str, m: int) -> list[str]:
    """Upload zero deltas for every copy (the job ends with θ as it was); returns the copies' tensor names."""
    worker = server.worker(server.token(job))
    for _ in range(m):
        lease = worker.post("/v1/work/lease").json()["lease_id"]
        copy = load(worker.get(f"/v1/work/leases/{lease}/copy").content)
        zeros = {name: torch.zeros(t.shape) for name, t in copy.items()}
        assert worker.put(f"/v1/work/leases/{lease}/delta", content=save(zeros)).status_code == 200
    return sorted(copy)


def test_a_downloaded_folder_publishes_only_what_a_worker_needs(server, tmp_path, as_a_download):
    folder = tmp_path / "model"
    folder.mkdir()
    tokenizer_files(folder)
    (tmp_path / "outside.json").write_text('{"secret": "the server\'s own file"}')
    (folder / "special_tokens_map.json").symlink_to(tmp_path / "outside.json")  # leaves the folder
    (folder / "vocab.json").symlink_to(folder / "tokenizer.json")  # stays inside
    as_a_download(folder, tiny("llama"), shard_bytes=4096, extra_files={"modeling_evil.py": "import os"})

    published = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json"]
    assert [p.name for p in public_files(folder)] == published
    job = server.create_job(folder, {"copies_m": 2})
    worker = server.worker(server.token(job))
    lease = worker.post("/v1/work/lease").json()
    assert lease["public_files"] == published
    for name in published:
        assert worker.get(f"/v1/work/files/{name}").status_code == 200, name
    for name in (".gitattributes", "README.md", "LICENSE", "modeling_evil.py", "special_tokens_map.json",
                 "pytorch_model.bin.index.json", "model-00001-of-00009.safetensors"):
        assert worker.get(f"/v1/work/files/{name}").status_code == 404, name
    copy = load(worker.get(f"/v1/work/leases/{lease['lease_id']}/copy").content)
    assert sorted(copy) == sorted(tiny("llama").state_dict().keys() - {"lm_head.weight"})  # all shards, tied head absent


def test_a_hugging_face_cache_snapshot_is_read_through_its_links(server, tmp_path):
    """Files of a cache snapshot link to ../../blobs/: that is the folder's own content."""
    saved = tmp_path / "saved"
    tiny("llama").save_pretrained(saved)
    tokenizer_files(saved)
    repo = tmp_path / "hub" / "models--org--tiny"
    snapshot = repo / "snapshots" / "abc123"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, path in enumerate(sorted(saved.iterdir())):
        blob = repo / "blobs" / f"blob{i}"
        path.rename(blob)
        (snapshot / path.name).symlink_to(os.path.relpath(blob, snapshot))
    job = server.create_job(snapshot, {"copies_m": 2})
    assert "tokenizer.json" in server.worker(server.token(job)).post("/v1/work/lease").json()["public_files"]


@pytest.mark.parametrize("case", ["not json", "no weight_map", "missing shard", "shard outside", "stale", "unlisted"])
def test_a_broken_index_is_refused_with_400_and_nothing_stored(server, tmp_path, case):
    folder = tmp_path / "model"
    tiny("llama").save_pretrained(folder, max_shard_size=4096)
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    weight_map = index["weight_map"]
    first = next(iter(weight_map))
    phrase = {
        "not json": "not valid UTF-8 JSON", "no weight_map": "weight_map", "missing shard": "missing from",
        "shard outside": "not plain file names", "stale": "does not match its shards",
        "unlisted": "does not match its shards",
    }[case]
    if case == "not json":
        index_path.write_text('{"weight_map": ')
    elif case == "no weight_map":
        index_path.write_text(json.dumps({"metadata": {}}))
    elif case == "missing shard":
        (folder / weight_map[first]).unlink()
    elif case == "shard outside":
        weight_map[first] = "../elsewhere.safetensors"
    elif case == "stale":
        weight_map["model.gone.weight"] = weight_map[first]
    else:  # a tensor whose shard holds others too
        shared = next(name for name in weight_map if list(weight_map.values()).count(weight_map[name]) > 1)
        del weight_map[shared]
    if case in ("shard outside", "stale", "unlisted"):
        index_path.write_text(json.dumps(index))
    response = server.admin.post("/v1/jobs", json={"task": "t", "model_dir": str(folder), "pum": {"seed": 1}})
    assert response.status_code == 400, response.text
    assert phrase in response.json()["detail"]
    assert server.admin.get("/v1/jobs").json() == [] and not list(server.settings.state_dir.glob("jobs/*"))


def test_file_names_over_255_bytes_are_404_not_500(server, tiny_model_dir):
    job = server.create_job(tiny_model_dir, {"copies_m": 2, "rounds_R": 1})
    worker = server.worker(server.token(job))
    finalize_unchanged(server, job, 2)
    assert server.admin.get(f"/v1/jobs/{job}").json()["state"] == "finalized"
    for name in ("a" * 256, "é" * 200, "config.json" + "x" * 300):
        assert worker.get(f"/v1/work/files/{name}").status_code == 404
        assert server.admin.get(f"/v1/jobs/{job}/model/{name}").status_code == 404
    assert server.admin.get(f"/v1/jobs/{job}/model/config.json").status_code == 200


def test_gpt_neox_checkpoint_with_legacy_names_is_mapped_to_the_model_names(server, tmp_path):
    """Pythia-style: `embed_out.weight` (now `lm_head.weight`) and per-layer attention buffers."""
    from transformers import AutoModelForCausalLM

    model = tiny("gpt_neox")
    folder = tmp_path / "neox"
    model.save_pretrained(folder)
    assert "embed_out.weight" in load_file(folder / "model.safetensors")  # transformers 5 saves the old name

    def legacy(tensors):
        for layer in range(2):
            tensors[f"gpt_neox.layers.{layer}.attention.bias"] = torch.ones(1, 1, 32, 32, dtype=torch.bool).tril()
            tensors[f"gpt_neox.layers.{layer}.attention.masked_bias"] = torch.tensor(-1e9)
            tensors[f"gpt_neox.layers.{layer}.attention.rotary_emb.inv_freq"] = torch.ones(4)
        return tensors

    rewrite_weights(folder, legacy)
    job = server.create_job(folder, {"copies_m": 2, "rounds_R": 1})
    assert finalize_unchanged(server, job, 2) == sorted(model.state_dict())
    exported = AutoModelForCausalLM.from_pretrained(server.admin.get(f"/v1/jobs/{job}").json()["output_dir"])
    assert torch.equal(exported.lm_head.weight, model.lm_head.weight)  # renamed, not re-initialised


def test_gpt2_checkpoint_in_the_legacy_layout_is_mapped(server, tmp_path):
    """The original GPT-2 files: no `transformer.` prefix, `attn.bias` buffers, tied head absent."""
    model = tiny("gpt2")
    folder = tmp_path / "gpt2"
    model.save_pretrained(folder)

    def legacy(tensors):
        tensors = {name.removeprefix("transformer."): t for name, t in tensors.items()}
        for layer in range(2):
            tensors[f"h.{layer}.attn.bias"] = torch.ones(1, 1, 32, 32).tril()
        return tensors

    rewrite_weights(folder, legacy)
    job = server.create_job(folder, {"copies_m": 2})
    assert sorted(a_copy(server, job)) == sorted(model.state_dict().keys() - {"lm_head.weight"})


def test_weights_that_do_not_fit_the_config_are_refused_listing_every_difference(server, tmp_path):
    folder = tmp_path / "model"
    tiny("llama").save_pretrained(folder)

    def broken(tensors):
        del tensors["model.norm.weight"]
        tensors["model.layers.0.mlp.up_proj.weight"] = torch.zeros(7, 16)
        tensors["model.extra.weight"] = torch.zeros(2)
        return tensors

    rewrite_weights(folder, broken)
    response = server.admin.post("/v1/jobs", json={"task": "t", "model_dir": str(folder)})
    assert response.status_code == 400, response.text
    detail = response.json()["detail"]
    for phrase in ("LlamaForCausalLM", "model.norm.weight", "model.extra.weight", "model.layers.0.mlp.up_proj.weight is [7, 16]"):
        assert phrase in detail, (phrase, detail)
    assert server.admin.get("/v1/jobs").json() == []


@pytest.mark.parametrize("where, content", [
    ("config.json", {"auto_map": {"AutoModelForCausalLM": "modeling_evil.EvilModel"}}),
    ("tokenizer_config.json", {"auto_map": {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}}),
    ("config.json", {"attn_implementation": "kernels-community/flash-attn"}),
    ("config.json", {"quantization_config": {"quant_method": "mxfp4"}}),
])
def test_a_model_that_loads_code_is_refused(server, tmp_path, where, content):
    folder = tmp_path / "model"
    tiny("llama").save_pretrained(folder)
    tokenizer_files(folder)
    path = folder / where
    path.write_text(json.dumps({**json.loads(path.read_text()), **content}))
    response = server.admin.post("/v1/jobs", json={"task": "t", "model_dir": str(folder)})
    assert response.status_code == 400, response.text
    assert where in response.json()["detail"] and next(iter(content)) in response.json()["detail"]


def test_a_tied_head_saved_next_to_its_embeddings_is_dropped_and_an_untied_one_is_required(server, tmp_path):
    """A model that ties lm_head to its embeddings takes the head from them: a saved copy of it is not perturbed
    on its own; a model that does not tie them needs its head."""
    tied = tmp_path / "tied"
    tiny("llama", tie=True).save_pretrained(tied)
    rewrite_weights(tied, lambda t: {**t, "lm_head.weight": t["model.embed_tokens.weight"].clone()})
    job = server.create_job(tied, {"copies_m": 2})
    assert "lm_head.weight" not in a_copy(server, job) and "model.embed_tokens.weight" in a_copy(server, job)

    untied = tmp_path / "untied"
    tiny("llama", tie=False).save_pretrained(untied)
    rewrite_weights(untied, lambda t: {n: v for n, v in t.items() if n != "lm_head.weight"})
    response = server.admin.post("/v1/jobs", json={"task": "t2", "model_dir": str(untied)})
    assert response.status_code == 400 and "missing from the checkpoint: lm_head.weight" in response.json()["detail"]


def test_the_meta_model_is_built_once_per_config_content(tiny_model_dir, tmp_path):
    """Every job of one model matches its checkpoint against one meta model; another config gets its own."""
    import shutil

    from pum.server.model_layout import meta_model

    copy = shutil.copytree(tiny_model_dir, tmp_path / "copy")
    assert meta_model(copy) is meta_model(tiny_model_dir)  # the same config.json bytes in another folder
    config = json.loads((copy / "config.json").read_text())
    config["intermediate_size"] = 48
    (copy / "config.json").write_text(json.dumps(config))
    changed = meta_model(copy)
    assert changed is not meta_model(tiny_model_dir)
    assert changed.model.layers[0].mlp.up_proj.weight.shape == (48, 16)
