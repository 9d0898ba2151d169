"""Exponential moving average of a module's parameters (EDM pretraining keeps one; RL does not)."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn


class ParameterEMA:
    """``ema <- decay * ema + (1 - decay) * param`` after every optimizer step.

    The average lives beside the module (float32 copies); :meth:`swapped_in` temporarily loads it
    into the module, e.g. for evaluation or sampling.
    """

    def __init__(self, module: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.module, self.decay = module, float(decay)
        self.shadow = {name: p.detach().clone() for name, p in module.named_parameters()}

    @torch.no_grad()
    def update(self) -> None:
        for name, p in self.module.named_parameters():
            self.shadow[name].lerp_(p.detach(), 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.shadow) - set(state)
        if missing:
            raise KeyError(f"EMA state lacks parameters: {sorted(missing)[:5]}")
        for name, value in state.items():
            self.shadow[name].copy_(value)

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The module holds the averaged weights inside the block, its own weights after."""
        saved = {name: p.detach().clone() for name, p in self.module.named_parameters()}
        with torch.no_grad():
            for name, p in self.module.named_parameters():
                p.copy_(self.shadow[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in self.module.named_parameters():
                    p.copy_(saved[name])
