"""Exponential moving average of a policy's weights (the weights we evaluate and deploy)."""

from __future__ import annotations

import copy
from typing import Generic, TypeVar

import torch
from torch import nn

M = TypeVar("M", bound=nn.Module)


class EMA(Generic[M]):
    """Keeps ``shadow`` = EMA of ``model``'s parameters; buffers (e.g. the normaliser) are copied.

    The effective decay warms up as ``min(decay, (1 + n) / (10 + n))`` so that early, fast-changing
    weights are not averaged with the random initialisation for thousands of steps.
    """

    def __init__(self, model: M, decay: float) -> None:
        self.decay = decay
        self.shadow: M = copy.deepcopy(model).eval().requires_grad_(False)
        self.num_updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.num_updates += 1
        decay = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        for ema_param, param in zip(self.shadow.parameters(), model.parameters(), strict=True):
            ema_param.lerp_(param.detach(), 1.0 - decay)
        for ema_buffer, buffer in zip(self.shadow.buffers(), model.buffers(), strict=True):
            ema_buffer.copy_(buffer)
