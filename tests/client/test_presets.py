"""presets/tofu/*.yaml: every preset loads, its names are understood by the trainer, and its rounds are PUM's."""

from __future__ import annotations

from pathlib import Path

import pytest

from pum.client.job_file import load_job_file
from pum.client.trainer import TrainConfig
from pum.common.schemas import TaskSpec

PRESETS = Path(__file__).resolve().parents[2] / "presets" / "tofu"
ROUNDS = {"GradAscent": 1, "GradDiff": 1, "UNDIAL": 1, "NPO": 2, "WGA": 2, "SimNPO": 10, "IdkDPO": 10, "SatImp": 10}


def test_one_preset_per_method():
    assert sorted(p.stem for p in PRESETS.glob("*.yaml")) == sorted(ROUNDS)


@pytest.mark.parametrize("method", sorted(ROUNDS))
def test_preset_loads_into_a_valid_worker_config(method):
    job = load_job_file(PRESETS / f"{method}.yaml", environ={}, overrides=["model_dir=/models/target"])
    pum = job["pum"]
    assert (pum["inner_handler"], pum["rounds_R"], pum["local_epochs"]) == (method, ROUNDS[method], 10)
    task = TaskSpec(method=pum["inner_handler"], epochs=pum["local_epochs"], rounds=pum["rounds_R"],
                    hyperparams=job["hyperparams"], prompt_format=pum["prompt_format"])
    config = TrainConfig.from_task(task)  # refuses any name neither PUM nor open-unlearning has
    assert (config.lr, config.weight_decay, config.warmup_epochs, config.schedule) == (1e-5, 0.01, 1.0, "linear")
    assert config.batch_size == (16 if method == "UNDIAL" else 32)
    assert job["model_dir"] == "/models/target"
