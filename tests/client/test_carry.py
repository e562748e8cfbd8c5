"""The data owner's carried state on disk (pum.client.carry): file formats, first-writer-wins,
what a copy of round r starts from, and the worker writing the state before its upload."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from safetensors.torch import save_file

from pum.client.carry import (
    CarryStore, carried_for_copy, check_name, decode_optimizer_state, encode_optimizer_state, load_weights_inplace,
)
from pum.client.trainer import TrainConfig
from pum.common.schemas import UploadKind

torch.set_num_threads(1)


def adamw_state(model, steps: int = 2) -> dict:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        sum(p.square().sum() for p in model.parameters()).backward()
        optimizer.step()
    return optimizer.state_dict()["state"]


def test_optimizer_state_round_trips_through_the_store(make_model, tmp_path):
    model = make_model(0)
    state = adamw_state(model)
    store = CarryStore(tmp_path / "job")
    assert store.load_optimizer_state(1) is None
    assert store.save_optimizer_state(1, state)
    loaded = store.load_optimizer_state(1)
    assert set(loaded) == set(state)
    for index, values in state.items():
        assert set(loaded[index]) == set(values)
        for key, value in values.items():
            assert torch.equal(loaded[index][key], value), (index, key)


def test_plain_values_ride_in_the_header_and_objects_are_refused():
    tensors, other = encode_optimizer_state({0: {"momentum_buffer": None, "step": torch.tensor(3.0)}})
    assert set(tensors) == {"0/step"} and other == {"0": {"momentum_buffer": None}}
    assert decode_optimizer_state(tensors, other) == {0: {"step": tensors["0/step"], "momentum_buffer": None}}
    with pytest.raises(ValueError, match="only tensors and plain values"):
        encode_optimizer_state({0: {"closure": object()}})
    with pytest.raises(ValueError, match="param index"):
        decode_optimizer_state({"exp_avg": torch.zeros(1)}, {})


def test_the_first_state_of_a_round_wins_and_old_rounds_are_dropped(tmp_path):
    store = CarryStore(tmp_path / "job")
    first, second = {0: {"step": torch.tensor(1.0)}}, {0: {"step": torch.tensor(2.0)}}
    assert store.save_optimizer_state(1, first) is True
    assert store.save_optimizer_state(1, second) is False
    assert store.load_optimizer_state(1)[0]["step"].item() == 1.0
    store.save_optimizer_state(2, first)
    store.save_optimizer_state(3, first)
    assert sorted(p.name for p in store.root.iterdir()) == ["optimizer-r2.safetensors", "optimizer-r3.safetensors"]
    assert not any(p.name.endswith(".tmp") for p in store.root.iterdir())


def test_a_file_this_module_did_not_write_is_refused(tmp_path):
    store = CarryStore(tmp_path / "job")
    store.root.mkdir(parents=True)
    save_file({"0/step": torch.zeros(())}, str(store.state_path(1)))  # no header
    with pytest.raises(ValueError, match="no optimiser-state header"):
        store.load_optimizer_state(1)
    store.save_optimizer_state(2, {0: {"step": torch.tensor(1.0)}})
    store.state_path(2).rename(store.state_path(4))  # the header says round 2
    with pytest.raises(ValueError, match="round 2"):
        store.load_optimizer_state(4)


@pytest.mark.parametrize("name", ["../up", "a/b", ".hidden", "", "x" * 201, "a b"])
def test_names_from_the_server_must_be_plain_folder_names(tmp_path, name):
    with pytest.raises(ValueError, match="safe folder name"):
        CarryStore.for_job(tmp_path, name, "job-1")
    with pytest.raises(ValueError, match="safe folder name"):
        CarryStore.for_job(tmp_path, "task", name)
    assert check_name("job id", "job-0a1b.c_d") == "job-0a1b.c_d"


def test_reference_first_copy_wins(tmp_path):
    store = CarryStore(tmp_path / "job")
    first, second = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file({"w": torch.ones(2)}, str(first))
    save_file({"w": torch.zeros(2)}, str(second))
    assert store.keep_reference(first) and not store.keep_reference(second)
    assert torch.equal(store.load_reference()["w"], torch.ones(2))


def test_reference_weights_load_into_a_tied_model_and_misfits_are_refused(make_model):
    source, target = make_model(1), make_model(0)
    tensors = {k: v for k, v in source.state_dict().items() if k != "lm_head.weight"}  # as a tied copy file has them
    load_weights_inplace(target, tensors)
    for name, tensor in source.state_dict().items():
        assert torch.equal(target.state_dict()[name], tensor), name
    bad = dict(tensors, **{"model.norm.weight": torch.ones(3)})
    with pytest.raises(ValueError, match="other shapes"):
        load_weights_inplace(target, bad)
    missing = {k: v for k, v in tensors.items() if k != "model.norm.weight"}
    with pytest.raises(ValueError, match="missing"):
        load_weights_inplace(target, missing)


def copy_file(model, path):
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}, str(path))
    return path


def test_a_copy_of_round_r_starts_from_round_1s_reference_and_round_r_minus_1s_state(make_model, tmp_path):
    store = CarryStore(tmp_path / "job")
    config = TrainConfig(method="NPO", rounds=3)
    round1, round2 = make_model(0), make_model(1)
    carried = carried_for_copy(store, config, round1, copy_file(round1, tmp_path / "c1.safetensors"), 1)
    assert carried.reference is None and carried.optimizer_state is None  # round 1: its own copy, fresh moments
    store.save_optimizer_state(1, {0: {"step": torch.tensor(5.0)}})
    store.save_optimizer_state(2, {0: {"step": torch.tensor(9.0)}})  # another copy already finished round 2
    carried = carried_for_copy(store, config, round2, copy_file(round2, tmp_path / "c2.safetensors"), 2)
    assert carried.optimizer_state[0]["step"].item() == 5.0  # the end of round 1, not round 2's first copy
    for name, tensor in round1.state_dict().items():
        assert torch.equal(carried.reference.state_dict()[name], tensor), name
    assert not any(p.requires_grad for p in carried.reference.parameters())


def test_without_carrying_a_copy_uses_itself(make_model, tmp_path):
    store = CarryStore(tmp_path / "job")
    config = TrainConfig(method="NPO", rounds=2, carry_reference=False, carry_optimizer=False)
    model = make_model(0)
    store.save_optimizer_state(1, {0: {"step": torch.tensor(5.0)}})
    carried = carried_for_copy(store, config, model, copy_file(model, tmp_path / "c.safetensors"), 2)
    assert carried.reference is None and carried.optimizer_state is None and not store.has_reference()


def test_a_late_joiner_keeps_its_copy_as_reference_and_starts_fresh_with_warnings(make_model, tmp_path, caplog):
    store = CarryStore(tmp_path / "job")
    model = make_model(0)
    with caplog.at_level(logging.WARNING, logger="pum.client.carry"):
        carried = carried_for_copy(store, TrainConfig(method="DPO", rounds=3), model,
                                   copy_file(model, tmp_path / "c.safetensors"), 3)
    assert carried.reference is None and carried.optimizer_state is None
    assert store.has_reference()  # rounds after this one use this copy
    assert "joined late" in caplog.text and "optimiser state from round 2" in caplog.text


def test_a_method_without_reference_keeps_none(make_model, tmp_path):
    store = CarryStore(tmp_path / "job")
    model = make_model(0)
    carried_for_copy(store, TrainConfig(method="GradDiff", rounds=2), model, copy_file(model, tmp_path / "c.safetensors"), 1)
    assert not store.has_reference()


def test_rmu_reads_the_same_hidden_states_from_a_reference_in_another_copys_basis():
    """Reparameterizations rotate heads and permute MLP channels inside a block, never the residual
    stream: every `output_hidden_states` entry (RMU's layer among them) and the logits are unchanged."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from pum.client.methods import get_method, parse_params
    from pum.common.noise import job_key_from_seed
    from pum.common.reparam import CopyTransform, adapter_for

    config = LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=48, attn_implementation="eager")
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    config_dict = {**config.to_dict(), "architectures": ["LlamaForCausalLM"]}
    transform = CopyTransform(adapter_for(config_dict), config_dict, job_key_from_seed(3), 1, 0)
    other = copy.deepcopy(model)
    other.load_state_dict({n: transform.forward(n, t) for n, t in model.state_dict().items()})
    assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        b = other(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    for layer, (x, y) in enumerate(zip(a.hidden_states, b.hidden_states)):
        torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-5, msg=f"hidden states {layer}")
    torch.testing.assert_close(b.logits, a.logits, rtol=1e-4, atol=1e-5)
    rmu = get_method("RMU")
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids}
    params = parse_params(rmu, {})
    same = rmu.loss(model, model, batch, batch, params)
    rotated = rmu.loss(model, other, batch, batch, params)
    torch.testing.assert_close(rotated, same, rtol=1e-5, atol=1e-7)


def test_the_worker_writes_the_state_before_its_upload(server, model_dir, forget_pairs, retain_pairs, tmp_path):
    """The upload that completes a round lets the next round start at once: its state must already be there."""
    from pum.client.api import WorkerAPI
    from pum.client.worker import Worker, WorkerOptions

    job = server.create_job(model_dir, {"copies_m": 2, "rounds_R": 2, "inner_handler": "NPO", "local_max_steps": 1,
                                        "noise_kappa": 0.0}, task="order")
    seen = []

    class Watching(WorkerAPI):
        def upload_delta(self, lease_id, path, progress=None, kind=UploadKind.DELTA):
            seen.append(sorted(p.name for p in (tmp_path / "carry" / "order" / job).iterdir()))
            return super().upload_delta(lease_id, path, progress, kind)

    options = WorkerOptions(saves_dir=tmp_path / "saves", carry_dir=tmp_path / "carry", progress=False)
    assert Worker(Watching(server.worker(server.token(job))), forget_pairs, retain_pairs, options,
                  sleep=lambda s: None).run() == 4
    assert seen[0] == ["optimizer-r1.safetensors", "reference.safetensors"]
    assert seen[2] == ["optimizer-r1.safetensors", "optimizer-r2.safetensors", "reference.safetensors"]
    assert not (tmp_path / "carry" / "order" / job).exists()  # removed when the job ended
