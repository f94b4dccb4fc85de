"""Composer's decoupled AdamW on PyTorch's fused (or foreach) AdamW kernels."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch


class FusedDecoupledAdamW(torch.optim.AdamW):
    """`composer.optim.DecoupledAdamW` semantics on `torch.optim.AdamW`'s fused kernel.

    DecoupledAdamW multiplies each weight by `1 - (lr / initial_lr) * weight_decay` per step,
    decoupling the decay from the learning rate. `torch.optim.AdamW` multiplies by
    `1 - lr * wd`; with `wd = weight_decay / initial_lr` (per parameter group, fixed at
    construction) both are the same update. Composer's implementation loops over parameters
    in Python and reads every step counter with `.item()` (a host sync per parameter on GPU);
    the fused kernel does the whole update in a few launches and keeps the counters on device.

    Args:
        params: Parameters or parameter groups (a group may set its own `weight_decay`).
        lr: Peak learning rate (schedulers scale it; the decay follows the same schedule).
        betas: Adam's moment coefficients.
        eps: Adam's denominator epsilon.
        weight_decay: Decoupled decay per step at the peak learning rate (Composer's meaning).
        fused: Use the fused kernel (CUDA and CPU); False falls back to foreach.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 1e-5,
        fused: bool = True,
    ) -> None:
        if lr <= 0:
            raise ValueError(f'optimizer.lr={lr} must be positive')
        groups = list(params)
        if groups and not isinstance(groups[0], dict):
            groups = [{'params': groups}]
        for group in groups:
            group['weight_decay'] = group.get('weight_decay', weight_decay) / group.get('lr', lr)
        super().__init__(groups, lr=lr, betas=tuple(betas), eps=eps, fused=fused or None, foreach=not fused)
        for group in self.param_groups:
            group['initial_lr'] = group['lr']
