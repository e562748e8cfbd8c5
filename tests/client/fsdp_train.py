"""Run under torchrun by tests/client/test_fsdp.py: runs of `run_unlearning` on models sharded over the
group with FSDP2 (gloo, CPU), the way a multi-GPU worker trains a copy (`pum.client.fsdp_worker`).

    torchrun --nproc-per-node 2 tests/client/fsdp_train.py RUNS_JSON

RUNS_JSON lists runs {"model": dir, "forget": jsonl, "retain": jsonl, "config": TrainConfig kwargs,
"out": dir, "state_in": carry dir or null}. The reference model, when the method reads one, is the
model as given. Process 0 writes OUT/trained.safetensors (the gathered weights), the full optimiser
state with `CarryStore(OUT)` and OUT/metrics.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pum.client.carry import CarryStore
from pum.client.fsdp import FsdpGroup, build_sharded, full_tensors
from pum.client.methods import get_method, parse_params
from pum.client.trainer import Carried, TrainConfig, run_unlearning
from pum.common.qa import load_qa


def one_run(group: FsdpGroup, run: dict) -> None:
    from transformers import AutoTokenizer

    folder, out = Path(run["model"]), Path(run["out"])
    config = TrainConfig(**run["config"])
    weights = load_file(folder / "model.safetensors") if group.rank == 0 else None
    model = build_sharded(folder, group, weights, trainable=True)
    method = get_method(config.method)
    reference = None
    if method.uses_reference(parse_params(method, config.params)):
        reference = build_sharded(folder, group, weights, trainable=False)
    state = None
    if run.get("state_in") and group.rank == 0:
        state = CarryStore(Path(run["state_in"])).load_optimizer_state(config.round - 1)
    carried = Carried(reference=reference, optimizer_state=state)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    metrics = run_unlearning(model, tokenizer, load_qa(run["forget"]), load_qa(run["retain"]), config,
                             carried=carried, parallel=group)
    names = [n for n in model.state_dict() if not (n == "lm_head.weight" and model.config.tie_word_embeddings)]
    gathered = dict(zip(names, full_tensors(model, names, group)))
    if group.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        save_file({name: t.contiguous() for name, t in gathered.items()}, str(out / "trained.safetensors"))
        CarryStore(out).save_optimizer_state(config.round, carried.optimizer_state or {})
        (out / "metrics.json").write_text(json.dumps({**metrics, "world": group.world}))


def main(runs_json: str) -> None:
    torch.set_num_threads(1)
    group = FsdpGroup.start("cpu")
    for run in json.loads(Path(runs_json).read_text()):
        one_run(group, run)
    group.close()


if __name__ == "__main__":
    main(*sys.argv[1:])
