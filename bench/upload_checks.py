"""Benchmark: the value check every uploaded tensor passes (finite, |x| ≤ 1e30), in one aminmax pass
against the two-pass check it replaced (`isfinite(t).all()` and `abs().max()`), on the tensors of a
float32 upload of the given size, one thread (the upload threads' setting). Prints seconds and the ratio.

    python bench/upload_checks.py [--params 196e6] [--repeat 3]
"""

from __future__ import annotations

import argparse
import time

import torch

from pum.server.uploads import check_values


def two_pass(name: str, tensor: torch.Tensor) -> None:
    """The check as it was: two passes and two model-sized temporaries."""
    if not torch.isfinite(tensor).all():
        raise ValueError(name)
    if tensor.numel() and tensor.abs().max().item() > 1e30:
        raise ValueError(name)


def seconds(check, tensors: list[torch.Tensor], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        for i, tensor in enumerate(tensors):
            check(str(i), tensor)
        best = min(best, time.perf_counter() - started)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=float, default=196e6)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    per_tensor = 1024 * 2816  # a Llama MLP matrix of the 196 M model
    tensors = [torch.randn(per_tensor) * 1e-3 for _ in range(int(args.params) // per_tensor)]
    gb = sum(t.numel() for t in tensors) * 4 / 1e9
    old, new = seconds(two_pass, tensors, args.repeat), seconds(check_values, tensors, args.repeat)
    print(f"{gb:.2f} GB float32, one thread: two passes {old:.3f} s, aminmax {new:.3f} s, {old / new:.1f}× faster")


if __name__ == "__main__":
    main()
