"""Clipping and the on-disk streaming accumulation, against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from pum.common import aggregate
from pum.common.codec import SafetensorsFile, TensorInfo, save_file_atomic


def write(path, tensors: dict[str, torch.Tensor]):
    save_file_atomic(path, [TensorInfo.of(n, t) for n, t in tensors.items()], tensors.values())
    return SafetensorsFile(path)


def test_clip_scale():
    assert aggregate.clip_scale(5.0, None) == 1.0
    assert aggregate.clip_scale(5.0, 10.0) == 1.0
    assert aggregate.clip_scale(5.0, 1.0) == pytest.approx(0.2)


def test_update_clip_scales_per_layer_then_total():
    # layer norms 3 and 4 (squares 9, 16): per-layer cap 2 → both to 2; total √8 > 2 → ×(2/√8)
    scales = aggregate.update_clip_scales({"layer.0": 9.0, "layer.1": 16.0}, per_layer=2.0, total=2.0)
    overall = 2.0 / math.sqrt(8.0)
    assert scales == pytest.approx({"layer.0": 2 / 3 * overall, "layer.1": 0.5 * overall})


def update(weight: float, tensors: dict[str, torch.Tensor], scales: dict[str, float] | None = None):
    return aggregate.WeightedUpdate(weight, tensors.__getitem__, scales or {})


def test_apply_merged_by_hand(tmp_path):
    theta = write(tmp_path / "theta", {"model.layers.0.w": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.0])})
    d1 = {"model.layers.0.w": torch.tensor([1.0, 1.0]), "b": torch.tensor([2.0])}
    d2 = {"model.layers.0.w": torch.tensor([3.0, -1.0]), "b": torch.tensor([4.0])}
    aggregate.apply_merged(theta, [update(1 / 1.0, d1), update(1 / 2.0, d2)], 0.5, tmp_path / "theta2")
    with SafetensorsFile(tmp_path / "theta2") as out:
        # S0 = 1.5, S1 = d1 + d2/2 = [2.5, 0.5], [4.0]; θ + 0.5·S1/1.5
        torch.testing.assert_close(out.read("model.layers.0.w"), torch.tensor([1 + 2.5 / 3, 2 + 0.5 / 3]))
        torch.testing.assert_close(out.read("b"), torch.tensor([4.0 / 3]))


def test_apply_merged_applies_each_groups_clip_factor(tmp_path):
    theta = write(tmp_path / "theta", {"model.layers.0.w": torch.zeros(2), "b": torch.zeros(1)})
    delta = {"model.layers.0.w": torch.tensor([3.0, 4.0]), "b": torch.tensor([1.0])}
    sums = aggregate.group_sum_squares(list(delta), delta.__getitem__)
    assert sums == pytest.approx({"layer.0": 25.0, "global": 1.0})
    scales = aggregate.update_clip_scales(sums, per_layer=1.0, total=None)
    aggregate.apply_merged(theta, [update(2.0, delta, scales)], 1.0, tmp_path / "out")
    with SafetensorsFile(tmp_path / "out") as out:  # η·w·c·Δ/S0 = c·Δ
        torch.testing.assert_close(out.read("model.layers.0.w"), torch.tensor([3.0, 4.0]) / 5.0)
        torch.testing.assert_close(out.read("b"), torch.tensor([1.0]))


def test_apply_merged_refuses_empty_round_and_non_finite_step(tmp_path):
    theta = write(tmp_path / "theta", {"w": torch.tensor([3e38])})
    with pytest.raises(ValueError, match="no copy"):
        aggregate.apply_merged(theta, [], 1.0, tmp_path / "out")
    with pytest.raises(ValueError, match="non-finite"):
        aggregate.apply_merged(theta, [update(1.0, {"w": torch.tensor([3e38])})], 1.0, tmp_path / "out")
    assert not (tmp_path / "out").exists()
