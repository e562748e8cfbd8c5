"""The per-tensor value check and the idle deadline of uploads (server/uploads.py)."""

from __future__ import annotations

import asyncio

import pytest
import torch

from pum.common.errors import InvalidInput, RequestTimeout
from pum.server.uploads import MAX_ABS_VALUE, check_values, idle_timeout


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bad, message", [
    (float("nan"), "NaN or Inf"), (float("inf"), "NaN or Inf"), (float("-inf"), "NaN or Inf"),
    (3 * MAX_ABS_VALUE, "magnitude"), (-3 * MAX_ABS_VALUE, "magnitude"),
])
def test_one_bad_value_anywhere_is_refused(dtype, bad, message):
    for where in (0, 517, 999):  # first, middle, last
        tensor = torch.zeros(1000, dtype=dtype)
        tensor[where] = bad
        with pytest.raises(InvalidInput, match=message):
            check_values("w", tensor)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_finite_values_within_the_bound_pass(dtype):
    check_values("w", torch.tensor([-MAX_ABS_VALUE / 2, 0.0, MAX_ABS_VALUE / 2]).to(dtype))
    check_values("empty", torch.zeros(0, 3, dtype=dtype))


async def _collect(chunks, pause_s: float) -> list[bytes]:
    got = []
    async for chunk in chunks:
        got.append(chunk)
        await asyncio.sleep(pause_s)  # the server busy with the chunk: not the client's silence
    return got


def test_a_slow_consumer_is_not_a_silent_client():
    async def prompt():
        for i in range(3):
            yield bytes([i])

    got = asyncio.run(_collect(idle_timeout(prompt(), 0.05), pause_s=0.2))
    assert got == [b"\x00", b"\x01", b"\x02"]


def test_a_silent_client_times_out_between_chunks():
    async def silent_after_one():
        yield b"a"
        await asyncio.sleep(5)
        yield b"b"

    with pytest.raises(RequestTimeout, match="nothing received for 0.1 s"):
        asyncio.run(_collect(idle_timeout(silent_after_one(), 0.1), pause_s=0))
