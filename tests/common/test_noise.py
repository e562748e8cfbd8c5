"""Zero-sum noise, secret derivation and the relative noise scale."""

from __future__ import annotations

import math

import pytest
import torch

from pum.common import noise
from pum.common.layers import group_names, layer_group

KEY = noise.job_key_from_seed(1)


def copies_of(structure: str, m: int = 5, shape=(4000,), sigma: float = 0.5, tau: float = 0.0):
    alphas = noise.draw_alphas(KEY, 1, m, 1.0, 2.0)
    z_mean = noise.mean_base_noise(KEY, 1, m, "w", shape)
    center = torch.zeros(shape)
    return alphas, [
        noise.CopyNoise(KEY, 1, k, m, alphas[k], tau, structure).add_noise_inplace("w", center.clone(), sigma, z_mean) for k in range(m)
    ]


def test_zero_sum_base_noise_cancels_under_harmonic_weights():
    alphas, copies = copies_of("zero_sum")
    weighted = sum(c / a for c, a in zip(copies, alphas)) / sum(1 / a for a in alphas)
    assert weighted.abs().max().item() < 1e-6
    plain = sum(copies) / len(copies)
    assert plain.abs().max().item() > 0.1


def test_each_zero_sum_component_keeps_unit_variance():
    m, shape = 4, (200_000,)
    z_mean = noise.mean_base_noise(KEY, 3, m, "t", shape)
    components = [noise.zero_sum_inplace(noise.base_noise(KEY, 3, k, "t", shape), z_mean, m) for k in range(m)]
    assert torch.stack(components).sum(0).abs().max().item() < 1e-5
    for eps in components:
        assert abs(eps.var().item() - 1.0) < 0.02


def test_independent_noise_does_not_cancel():
    alphas, copies = copies_of("independent")
    weighted = sum(c / a for c, a in zip(copies, alphas)) / sum(1 / a for a in alphas)
    assert weighted.std().item() > 0.1


def test_jitter_has_scale_tau_and_is_independent_of_alpha():
    _, copies = copies_of("zero_sum", sigma=0.0, tau=0.25, shape=(100_000,))
    assert all(abs(c.std().item() - 0.25) < 0.005 for c in copies)
    assert not torch.equal(copies[0], copies[1])


def test_seeds_are_deterministic_and_distinct_per_purpose_round_copy_tensor():
    seeds = {
        noise.derive_seed(KEY, p, r, k, t)
        for p in ("z", "xi") for r in (1, 2) for k in (0, 1) for t in ("a", "b")
    }
    assert len(seeds) == 16
    assert noise.derive_seed(KEY, "z", 1, 0, "a") == noise.derive_seed(KEY, "z", 1, 0, "a")
    assert noise.derive_seed(noise.new_job_key(), "z", 1, 0, "a") != noise.derive_seed(KEY, "z", 1, 0, "a")
    assert all(0 <= s < 2**63 for s in seeds)


def test_alphas_lie_in_range_and_depend_on_key_and_round():
    alphas = noise.draw_alphas(KEY, 1, 1000, 1.5, 3.0)
    assert min(alphas) >= 1.5 and max(alphas) <= 3.0
    assert abs(sum(alphas) / 1000 - 2.25) < 0.05
    assert noise.draw_alphas(KEY, 2, 3, 1.0, 2.0) != noise.draw_alphas(KEY, 1, 3, 1.0, 2.0)


def test_zero_sum_needs_two_copies():
    with pytest.raises(ValueError, match="at least two copies"):
        noise.zero_sum_inplace(torch.zeros(2), torch.zeros(2), 1)


def test_noise_is_float32_whatever_the_center_dtype():
    out = noise.CopyNoise(KEY, 1, 0, 2, 1.0, 0.0, "independent").add_noise_inplace("w", torch.zeros(3, dtype=torch.bfloat16), 1.0, None)
    assert out.dtype == torch.float32


def test_relative_sigmas_by_hand():
    sums, counts = {"layer.0": 4.0, "global": 36.0}, {"layer.0": 4, "global": 4}
    assert noise.relative_sigmas(sums, counts, 0.1, per_layer=True) == pytest.approx({"layer.0": 0.1, "global": 0.3})
    single = math.sqrt(40 / 8) * 0.1
    assert noise.relative_sigmas(sums, counts, 0.1, per_layer=False) == pytest.approx({"layer.0": single, "global": single})


def test_layer_groups():
    assert layer_group("model.layers.11.mlp.up_proj.weight") == "layer.11"
    assert layer_group("model.embed_tokens.weight") == "global"
    assert layer_group("lm_head.weight") == "global"
    names = ["model.layers.10.a", "model.norm.weight", "model.layers.2.b", "model.layers.2.c"]
    assert group_names(names) == ["layer.2", "layer.10", "global"]
