"""What a worker refuses from a hostile server: unsafe names, code-loading configs, oversized or malformed copies."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from pum.client.lease_checks import RefusedLease, check_lease, check_served_files, load_served_model, read_copy
from pum.common.errors import InvalidInput


def a_lease(**changes) -> dict:
    reply = {
        "status": "leased", "lease_id": "lease-abc_DEF-123", "job_id": "job-1", "task_name": "tofu.forget10",
        "round": 1, "rounds_R": 1, "ttl_s": 30.0, "public_files": ["config.json", "tokenizer.json"],
        "task": {"method": "GradAscent", "epochs": 1.0, "rounds": 1, "hyperparams": {}},
    }
    return {**reply, **changes}


HOSTILE_FILE_NAMES = [
    "../../.bashrc", "/etc/cron.d/pum", ".bashrc", "sub/config.json", "sub\\config.json", "..", ".", "",
    "config.json\x00.txt", "a" * 256, "é" * 128, 7, None, "config.json\n",
]
HOSTILE_TASK_NAMES = ["/tmp/elsewhere", "../..", "..", ".hidden", "a/b", "", "x" * 101, "task\n", 3, None]


@pytest.mark.parametrize("name", HOSTILE_FILE_NAMES, ids=repr)
def test_a_lease_with_a_file_name_that_is_not_plain_is_refused(name):
    with pytest.raises(RefusedLease, match="not plain file names"):
        check_lease(a_lease(public_files=["config.json", name]))


@pytest.mark.parametrize("task_name", HOSTILE_TASK_NAMES, ids=repr)
def test_a_lease_with_a_task_name_that_is_not_one_safe_segment_is_refused(task_name):
    with pytest.raises(RefusedLease, match="task_name"):
        check_lease(a_lease(task_name=task_name))


@pytest.mark.parametrize("field, value", [
    ("lease_id", "../../v1/jobs"), ("lease_id", "x" * 129), ("round", 0), ("round", True), ("round", 1.5),
    ("ttl_s", float("inf")), ("ttl_s", float("nan")), ("ttl_s", -1), ("public_files", "config.json"),
    ("public_files", ["tokenizer.json"]),
])
def test_other_unsafe_lease_fields_are_refused(field, value):
    with pytest.raises(RefusedLease, match=field):
        check_lease(a_lease(**{field: value}))


def test_a_sound_lease_keeps_only_the_files_a_worker_needs():
    lease = check_lease(a_lease(public_files=["config.json", "README.md", "modeling_evil.py", "tokenizer.json", "config.json"]))
    assert lease.public_files == ("config.json", "tokenizer.json")
    assert (lease.id, lease.task_name, lease.round, lease.ttl_s) == ("lease-abc_DEF-123", "tofu.forget10", 1, 30.0)


@pytest.mark.parametrize("name, content, phrase", [
    ("config.json", {"model_type": "llama", "auto_map": {"AutoConfig": "evil.Config"}}, "auto_map"),
    ("tokenizer_config.json", {"auto_map": {"AutoTokenizer": ["evil.Tok", None]}}, "auto_map"),
    ("config.json", {"text_config": {"auto_map": {"AutoModel": "evil.M"}}}, "text_config.auto_map"),
    ("config.json", {"_attn_implementation": "kernels-community/flash-attn"}, "kernels-community"),
    ("config.json", {"attn_implementation": {"text_config": "evil/kernel"}}, "evil/kernel"),
    ("config.json", {"quantization_config": {"quant_method": "mxfp4"}}, "quantization_config"),
    ("config.json", {"vision_config": {"use_pretrained_backbone": True}}, "use_pretrained_backbone"),
    ("generation_config.json", "not json{", "not UTF-8 JSON"),
])
def test_served_files_that_would_load_code_are_refused(tmp_path, name, content, phrase):
    (tmp_path / name).write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(RefusedLease, match=phrase):
        check_served_files(tmp_path)


def test_served_files_of_a_saved_model_pass(model_dir):
    check_served_files(model_dir)  # a real save_pretrained folder: config, generation config, tokenizer files
    (model_dir / "config.json").write_text(json.dumps({**json.loads((model_dir / "config.json").read_text()),
                                                        "attn_implementation": "sdpa"}))
    check_served_files(model_dir)


def test_a_copy_is_parsed_with_the_servers_limits(tmp_path):
    good = tmp_path / "good.safetensors"
    save_file({"w": torch.ones(2, 3)}, good)
    assert torch.equal(read_copy(good)["w"], torch.ones(2, 3))
    huge_header = tmp_path / "huge.safetensors"
    huge_header.write_bytes(struct.pack("<Q", 2**40) + b"{}")
    with pytest.raises(InvalidInput, match="over the limit"):
        read_copy(huge_header)
    trailing = tmp_path / "trailing.safetensors"
    trailing.write_bytes(good.read_bytes() + b"\0" * 8)
    with pytest.raises(InvalidInput, match="its header declares"):
        read_copy(trailing)
    claims_more = tmp_path / "claims_more.safetensors"
    claims_more.write_bytes(good.read_bytes()[:-4])
    with pytest.raises(InvalidInput):
        read_copy(claims_more)


def test_a_copy_that_does_not_fit_the_served_config_is_refused(model_dir):
    from safetensors.torch import load_file

    received = load_file(model_dir / "model.safetensors")
    model, _ = load_served_model(model_dir, "cpu", received)
    assert set(received) <= set(model.state_dict())
    name = next(iter(received))
    extra = {**received, "model.extra.weight": torch.zeros(1)}
    save_file(extra, model_dir / "model.safetensors")
    with pytest.raises(RefusedLease, match="model.extra.weight"):
        load_served_model(model_dir, "cpu", extra)
    save_file({n: t for n, t in received.items() if n != name}, model_dir / "model.safetensors")
    with pytest.raises(RefusedLease, match=name):
        load_served_model(model_dir, "cpu", received)


def test_served_code_is_never_run_even_when_a_config_asks_for_it(model_dir, tmp_path):
    """The second wall behind check_served_files: loading itself never trusts remote code."""
    marker = tmp_path / "ran"
    code = f"open({str(marker)!r}, 'w').write('served code ran')\n"
    for module in ("modeling_evil.py", "configuration_evil.py", "tokenization_evil.py"):
        (model_dir / module).write_text(code)
    config = json.loads((model_dir / "config.json").read_text())
    config.update(model_type="evil", auto_map={
        "AutoConfig": "configuration_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.EvilModel",
    })
    (model_dir / "config.json").write_text(json.dumps(config))
    tokenizer_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    tokenizer_config["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    (model_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    with pytest.raises(ValueError):  # transformers refuses; it must not prompt or import
        load_served_model(model_dir, "cpu", {})
    assert not marker.exists()
