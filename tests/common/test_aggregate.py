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


def test_accumulate_and_apply_by_hand(tmp_path):
    theta = write(tmp_path / "theta", {"model.layers.0.w": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.0])})
    d1 = write(tmp_path / "d1", {"model.layers.0.w": torch.tensor([1.0, 1.0]), "b": torch.tensor([2.0])})
    d2 = write(tmp_path / "d2", {"model.layers.0.w": torch.tensor([3.0, -1.0]), "b": torch.tensor([4.0])})
    aggregate.accumulate_delta(d1, None, tmp_path / "s1_1", 1 / 1.0)
    with SafetensorsFile(tmp_path / "s1_1") as s1:
        aggregate.accumulate_delta(d2, s1, tmp_path / "s1_2", 1 / 2.0)
    s0 = 1.0 + 0.5
    with SafetensorsFile(tmp_path / "s1_2") as s1:
        aggregate.apply_update(theta, s1, s0, 0.5, tmp_path / "theta2")
    with SafetensorsFile(tmp_path / "theta2") as out:
        # S1 = d1 + d2/2 = [2.5, 0.5], [4.0]; θ + 0.5·S1/1.5
        torch.testing.assert_close(out.read("model.layers.0.w"), torch.tensor([1 + 2.5 / 3, 2 + 0.5 / 3]))
        torch.testing.assert_close(out.read("b"), torch.tensor([4.0 / 3]))


def test_accumulate_applies_alignment_and_clipping(tmp_path):
    delta = write(tmp_path / "d", {"model.layers.0.w": torch.tensor([3.0, 4.0])})
    stats = aggregate.accumulate_delta(
        delta, None, tmp_path / "s", 2.0, align=lambda name, t: t.flip(0), clip_per_layer=1.0
    )
    assert stats["delta_norm"] == pytest.approx(5.0)
    with SafetensorsFile(tmp_path / "s") as s1:
        torch.testing.assert_close(s1.read("model.layers.0.w"), torch.tensor([4.0, 3.0]) * 2.0 / 5.0)


def test_apply_update_refuses_empty_round(tmp_path):
    theta = write(tmp_path / "theta", {"w": torch.zeros(1)})
    with pytest.raises(ValueError, match="no copy"):
        aggregate.apply_update(theta, theta, 0.0, 1.0, tmp_path / "out")
