"""Random numbers that belong to a sample, not to the rank or microbatch that happens to draw them.

Training's draws (t, the noise, the conditioning mask, the self-conditioning coin) are functions
of (seed, epoch, the sample's index in the dataset, what is drawn, the draw's position) alone:
the same run on 1 or 8 ranks, with any microbatch size, resumed mid-epoch or on another world
size, corrupts every sample the same way. Streaming already gives the same global sample order
on any number of ranks, so the whole trajectory then depends on the topology only through
floating-point summation order.

The generator is counter-based: each number is Wellons' `lowbias32` (a bijective 32-bit mix)
of its key XOR its counter's Weyl step, computed with elementwise integer ops on the tensors'
device, with no Python loop over samples. The values live in int64 tensors below 2**32
and every product stays below 2**63 (`_mul32`), so nothing relies on integer overflow. Normals
come from uniforms by Box-Muller.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

MASK32 = 0xFFFFFFFF
GOLDEN32 = 0x9E3779B9  # the counter's stride: 2**32 / golden ratio

# What is drawn: each gets its own stream of numbers per sample.
T, NOISE, MASK, COIN = 1, 2, 3, 4
TRAJECTORY, JUMP = 5, 6  # a distillation's teacher noise and the jumps its rows train


def _mul32(x: Any, c: int) -> Any:
    """(x * c) mod 2**32 for x in [0, 2**32), without an int64 product above 2**49."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & MASK32


def mix32(x: Any) -> Any:
    """Wellons' lowbias32: a bijection of [0, 2**32) with good avalanche, on int64 tensors or ints.

    Keys made of Python ints stay on the host: no scalar is copied to the device (a blocking copy
    would wait for the device's queue).
    """
    x = x & MASK32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


class SampleDraws:
    """The random numbers of a batch's samples, each a function of (seed, epoch, index, stream, counter).

    Args:
        seed: The run's seed.
        epoch: The epoch the batch belongs to (a sample seen again in a later epoch draws anew).
        index: (B,) int64, each sample's index in its dataset.
    """

    def __init__(self, seed: int, epoch: int, index: torch.Tensor) -> None:
        head = mix32((seed & MASK32) ^ mix32(((seed >> 32) ^ epoch) & MASK32))  # a Python int
        index = index.long()
        self.keys = mix32(mix32(index & MASK32) ^ mix32((index >> 32) ^ head))  # (B,)

    def uniform(self, stream: int, n: int, start: int = 0) -> torch.Tensor:
        """(B, n) float32 in (0, 1): counters start .. start + n of `stream`, 23 bits each."""
        key = mix32(self.keys ^ _mul32(stream, GOLDEN32))
        counter = _mul32(torch.arange(start, start + n, device=self.keys.device), GOLDEN32)
        x = mix32(key[:, None] ^ counter[None, :])
        return ((x >> 9).float() + 0.5) * 2.0**-23

    def normal(self, stream: int, n: int) -> torch.Tensor:
        """(B, n) float32 standard normals (Box-Muller on 2 * ceil(n / 2) uniforms of `stream`)."""
        half = (n + 1) // 2
        u = self.uniform(stream, 2 * half)
        radius = torch.sqrt(-2.0 * torch.log(u[:, :half]))
        angle = (2.0 * math.pi) * u[:, half:]
        return torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)], dim=1)[:, :n]

    def columns(self, stream: int) -> Callable[..., torch.Tensor]:
        """`uniform(B, *shape)` like `torch.rand`, each call taking the next counters of `stream`."""
        taken = 0

        def uniform(batch: int, *shape: int) -> torch.Tensor:
            nonlocal taken
            n = math.prod(shape)
            if batch != len(self.keys):
                raise ValueError(f'{batch} rows asked of draws for {len(self.keys)} samples')
            out = self.uniform(stream, n, start=taken).reshape(batch, *shape)
            taken += n
            return out

        return uniform
