"""The pure maths of the reparameterizations, on tensors small enough to check by hand."""

from __future__ import annotations

import math

import pytest
import torch

from pum.common.reparam import maths

torch.set_num_threads(1)


def rope(x: torch.Tensor, position: int, rotary_dim: int, base: float = 10000.0) -> torch.Tensor:
    """Hugging Face `rotate_half` RoPE on the first rotary_dim coordinates of vectors x[..., d]."""
    half = rotary_dim // 2
    inv_freq = 1.0 / base ** (torch.arange(half, dtype=torch.float64) * 2 / rotary_dim)
    angles = torch.cat([position * inv_freq] * 2)
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    rotated_half = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
    return torch.cat([rot * torch.cos(angles) + rotated_half * torch.sin(angles), rest], dim=-1)


def rms_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return weight * x / x.pow(2).mean(-1, keepdim=True).sqrt()


def test_haar_orthogonal_is_orthogonal_and_seeded():
    q = maths.haar_orthogonal(6, torch.Generator().manual_seed(0))
    torch.testing.assert_close(q @ q.T, torch.eye(6), atol=1e-6, rtol=0)
    assert q.dtype == torch.float32
    assert torch.equal(q, maths.haar_orthogonal(6, torch.Generator().manual_seed(0)))
    assert not torch.equal(q, maths.haar_orthogonal(6, torch.Generator().manual_seed(1)))


def test_plane_rotation_by_hand():
    r = maths.plane_rotation(torch.tensor([math.pi / 2, 0.0], dtype=torch.float64))
    # plane (0, 2) turned a quarter: e0 → e2, e2 → −e0; plane (1, 3) untouched
    expected = torch.tensor([[0, 0, -1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=torch.float64)
    torch.testing.assert_close(r, expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("head_dim, rotary_dim", [(8, 8), (12, 6), (16, 8)])
def test_rope_commuting_rotation_preserves_rope_scores(head_dim, rotary_dim):
    """(RoPE_m R q)·(RoPE_n R k) = (RoPE_m q)·(RoPE_n k) for every pair of positions."""
    generator = torch.Generator().manual_seed(3)
    r = maths.rope_commuting_rotation(head_dim, rotary_dim, generator).double()
    torch.testing.assert_close(r @ r.T, torch.eye(head_dim, dtype=torch.float64), atol=1e-6, rtol=0)
    q, k = torch.randn(2, head_dim, generator=generator, dtype=torch.float64)
    for m, n in [(0, 0), (1, 5), (7, 2), (30, 31)]:
        original = rope(q, m, rotary_dim) @ rope(k, n, rotary_dim)
        rotated = rope(r @ q, m, rotary_dim) @ rope(r @ k, n, rotary_dim)
        torch.testing.assert_close(rotated, original, atol=1e-5, rtol=0)


def test_a_generic_orthogonal_map_does_not_commute_with_rope():
    """Why the q/k map is restricted to the RoPE planes."""
    generator = torch.Generator().manual_seed(4)
    r = maths.haar_orthogonal(8, generator).double()
    q, k = torch.randn(2, 8, generator=generator, dtype=torch.float64)
    assert abs(rope(r @ q, 3, 8) @ rope(r @ k, 9, 8) - rope(q, 3, 8) @ rope(k, 9, 8)) > 1e-3


def test_plane_rotation_commutes_with_a_per_head_norm_only_where_plane_weights_are_equal():
    """Qwen3's q_norm/k_norm: w ⊙ (R x)/rms = R (w ⊙ x/rms) iff w_t = w_{t+h} on rotated planes."""
    generator = torch.Generator().manual_seed(5)
    r = maths.rope_commuting_rotation(8, 8, generator).double()
    x = torch.randn(8, generator=generator, dtype=torch.float64)
    equal = torch.tensor([0.5, 2.0, 1.5, 0.7] * 2, dtype=torch.float64)
    unequal = torch.tensor([0.5, 2.0, 1.5, 0.7, 1.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(rms_norm(r @ x, equal), r @ rms_norm(x, equal))
    assert float((rms_norm(r @ x, unequal) - r @ rms_norm(x, unequal)).abs().max()) > 1e-2


def test_permutations_by_hand():
    p = torch.tensor([2, 0, 1])
    w = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    assert torch.equal(maths.permute_rows(w, p), torch.tensor([[5.0, 6.0], [1.0, 2.0], [3.0, 4.0]]))
    assert torch.equal(maths.permute_columns(w.T, p), w.T[:, [2, 0, 1]])
    assert torch.equal(maths.invert_permutation(p), torch.tensor([1, 2, 0]))
    assert torch.equal(maths.permute_rows(maths.permute_rows(w, p), maths.invert_permutation(p)), w)


def test_kv_group_is_repeat_kv():
    assert maths.kv_group(6, 2).tolist() == [0, 0, 0, 1, 1, 1]
    assert maths.kv_group(4, 4).tolist() == [0, 1, 2, 3]


def test_head_maps_by_hand():
    """Two heads of d_h = 2; head 0 swapped by M_0 = [[0, 1], [1, 0]], head 1 negated by M_1 = −I."""
    matrices = torch.stack([torch.tensor([[0.0, 1.0], [1.0, 0.0]]), -torch.eye(2)])
    group = torch.tensor([0, 1])
    rows = torch.tensor([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0], [4.0, 40.0]])  # [n·d_h, in]
    assert torch.equal(maths.left_multiply_heads(rows, matrices, group),
                       torch.tensor([[2.0, 20.0], [1.0, 10.0], [-3.0, -30.0], [-4.0, -40.0]]))
    bias = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert torch.equal(maths.left_multiply_heads(bias, matrices, group), torch.tensor([2.0, 1.0, -3.0, -4.0]))
    columns = rows.T  # [out, n·d_h]: columns · M
    assert torch.equal(maths.right_multiply_heads(columns, matrices, group),
                       torch.tensor([[2.0, 1.0, -3.0, -4.0], [20.0, 10.0, -30.0, -40.0]]))


def test_rope_commuting_rotation_refuses_an_odd_rotary_dim():
    with pytest.raises(ValueError, match="even"):
        maths.rope_commuting_rotation(8, 5, torch.Generator())
