"""One copy trained by the processes of a torchrun group, each holding a shard of it: PyTorch FSDP2.

`FsdpGroup.start()` joins the group torchrun set up (NCCL for GPU tensors, gloo for CPU ones; gloo
alone on CPU, which is how the tests run it) and is the trainer's `DataParallel`:

- every process runs its slots of each step (`pum.client.microbatch`): the losses are already
  divided by the whole step's counts, so FSDP's gradient reduction is a plain sum (divide factor 1),
  and the result is single-process training up to float rounding;
- the optimiser state crosses in full form, keyed by trainable-parameter index, through
  `torch.distributed.checkpoint`'s get/set_optimizer_state_dict (full_state_dict), so the next
  round may run with another number of processes, or one.

`build_sharded` builds the served config's model on the meta device, applies `fully_shard` to each
decoder block (the model's `_no_split_modules`) and to the root, materialises the shards on the
process's device, rebuilds the non-persistent buffers (rotary frequencies) with the model's own
initialiser, and streams the weights from process 0 one tensor at a time
(`set_model_state_dict(..., broadcast_from_rank0=True)`), so no process ever holds a whole float32
model. `full_tensors` gathers the trained weights back, one tensor at a time, onto process 0.

Every function here is collective: all processes call it, in the same order. Process 0 checks its
inputs before (`pum.client.fsdp_worker`); a check that only process 0 can make is broadcast, so all
processes raise the same ValueError together.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from pum.client.parallel import optimizer_state_problems

# Process 0 talks to the server between copies (lease waits, downloads, uploads: hours for a 70B
# copy on a slow link) while the others wait in a broadcast; the training collectives keep the
# backend's default timeout.
CONTROL_TIMEOUT = timedelta(hours=24)


@dataclass
class FsdpGroup:
    rank: int
    world: int
    device: torch.device
    mesh: DeviceMesh
    control: dist.ProcessGroup  # gloo, CONTROL_TIMEOUT: process 0's messages

    @classmethod
    def start(cls, device: str | None = None) -> FsdpGroup:
        """Join torchrun's group (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR in the environment).

        `device`: "cpu" (gloo), or None / "cuda": GPU LOCAL_RANK of this machine (NCCL) when there is one."""
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        use_cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
        if use_cuda:
            torch.cuda.set_device(local_rank)
            here = torch.device("cuda", local_rank)
            dist.init_process_group("cpu:gloo,cuda:nccl", device_id=here)
        else:
            here = torch.device("cpu")
            dist.init_process_group("gloo")
        control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
        return cls(dist.get_rank(), dist.get_world_size(), here, init_device_mesh(here.type, (dist.get_world_size(),)),
                   control)

    def close(self) -> None:
        dist.destroy_process_group()

    # ---- messages from process 0
    def broadcast_json(self, message=None):
        """Process 0's `message` (JSON-able) on every process; the others pass None. JSON, never pickle."""
        data = json.dumps(message).encode() if self.rank == 0 else b""
        size = torch.tensor([len(data)], dtype=torch.int64)
        dist.broadcast(size, 0, group=self.control)
        buffer = torch.frombuffer(bytearray(data), dtype=torch.uint8) if self.rank == 0 else torch.empty(
            int(size), dtype=torch.uint8)
        dist.broadcast(buffer, 0, group=self.control)
        return json.loads(buffer.numpy().tobytes().decode())

    # ---- DataParallel
    def total(self, value: torch.Tensor) -> torch.Tensor:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value

    def load_optimizer_state(self, model, optimizer, state) -> None:
        names = trainable_names(model)
        verdict = None
        if self.rank == 0:
            shapes = [tuple(p.shape) for p in _trainable(model)]  # DTensor shapes are the full ones
            problems = optimizer_state_problems(state or {}, shapes)
            verdict = {"load": bool(state), "problems": problems}
        verdict = self.broadcast_json(verdict)
        if verdict["problems"]:
            raise ValueError("the carried optimiser state does not fit this model: " + "; ".join(verdict["problems"]))
        if not verdict["load"]:
            return
        full = {}
        if self.rank == 0:
            groups = [{key: value for key, value in group.items() if key != "params"} | {"params": names}
                      for group in optimizer.param_groups]
            full = {"state": {names[i]: dict(values) for i, values in state.items()}, "param_groups": groups}
        set_optimizer_state_dict(model, optimizer, full,
                                 options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))

    def optimizer_state(self, model, optimizer) -> dict | None:
        full = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                                   cpu_offload=True))
        if self.rank != 0:
            return None
        index = {name: i for i, name in enumerate(trainable_names(model))}
        return {index[name]: values for name, values in full["state"].items()}


def _trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def trainable_names(model: torch.nn.Module) -> list[str]:
    """The trainable parameters' names in `model.parameters()` order: the trainer's optimiser index → name."""
    return [name for name, p in model.named_parameters() if p.requires_grad]


def meta_model(folder: Path) -> torch.nn.Module:
    """The served config's model on the meta device (no memory): built-in classes only, local files only."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder, trust_remote_code=False, local_files_only=True)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=False, dtype=torch.float32)


def build_sharded(
    folder: Path, group: FsdpGroup, tensors: Mapping[str, torch.Tensor] | None, *, trainable: bool, bf16: bool = False
) -> torch.nn.Module:
    """The model of `folder`'s config, sharded over `group`, with process 0's `tensors` as weights.

    `tensors`: on process 0 every weight of the model (a tied one may be absent), checked by the
    caller (`pum.client.carry.weight_mismatches`); None on the others. `trainable` False: a frozen
    model in eval mode (the reference), resharded after every forward. `bf16`: all-gather the
    weights in bfloat16 for the forward (MixedPrecisionPolicy); the shards, gradients (reduced in
    float32) and optimiser state stay float32.
    """
    model = meta_model(folder)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    blocks = set(getattr(model, "_no_split_modules", None) or ())
    if not blocks:
        raise ValueError(f"{type(model).__name__} names no decoder block class (_no_split_modules): cannot shard it")
    for module in model.modules():
        if type(module).__name__ in blocks:
            fully_shard(module, mesh=group.mesh, mp_policy=policy, reshard_after_forward=True)
    # The root (embeddings, final norm, head) stays gathered from forward to backward when trained (FSDP's default).
    fully_shard(model, mesh=group.mesh, mp_policy=policy, reshard_after_forward=None if trainable else True)
    model.to_empty(device=group.device)
    _rebuild_buffers(model)
    _load_streamed(model, group, tensors)
    for module in model.modules():
        if isinstance(module, FSDPModule):  # the losses are the step's shares: sum the gradients, never average
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # plain SUM (gloo has no pre-multiplied sum)
    if not trainable:
        model.requires_grad_(False)
        model.eval()
    return model


@torch.no_grad()
def _rebuild_buffers(model: torch.nn.Module) -> None:
    """Non-persistent buffers (rotary frequencies) are not in any state dict and `to_empty` left them
    uninitialised: the model's own initialiser computes them again from the config, as transformers
    does after loading on the meta device."""
    for module in model.modules():
        if module._non_persistent_buffers_set:
            model._init_weights(module)


def _load_streamed(model: torch.nn.Module, group: FsdpGroup, tensors: Mapping[str, torch.Tensor] | None) -> None:
    """Process 0's tensors into the shards, one at a time, each a fresh float32 copy (the call keeps it)."""
    names = group.broadcast_json(list(tensors) if group.rank == 0 else None)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
    for name in names:
        piece = {name: tensors[name].to(torch.float32, copy=True)} if group.rank == 0 else {}
        set_model_state_dict(model, piece, options=options)


def full_tensors(model: torch.nn.Module, names: list[str], group: FsdpGroup) -> Iterator[torch.Tensor | None]:
    """The weights `names` in full, one at a time, on process 0's CPU (None on the others)."""
    state = model.state_dict()  # sharded DTensors: no communication
    for name in names:
        tensor = state[name]
        full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
        yield full.detach().to("cpu") if group.rank == 0 else None
