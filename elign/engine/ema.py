"""Exponential moving average of the trainable parameters (EDM pretraining keeps one; RL does not)."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn


class ParameterEMA:
    """``ema <- decay * ema + (1 - decay) * param`` after every optimizer step.

    Only the parameters given (the trainable ones) are averaged: frozen base weights of an adapter
    run never change, so shadowing them would only double their memory. :meth:`swapped_in`
    temporarily loads the average into the parameters, e.g. for evaluation or sampling.
    """

    def __init__(self, params: list[tuple[str, nn.Parameter]], decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.params, self.decay = dict(params), float(decay)
        self.shadow = {name: p.detach().clone() for name, p in self.params.items()}

    @torch.no_grad()
    def update(self) -> None:
        for name, p in self.params.items():
            self.shadow[name].lerp_(p.detach(), 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.shadow) - set(state)
        if missing:
            raise KeyError(f"EMA state lacks parameters: {sorted(missing)[:5]}")
        for name in self.shadow:
            self.shadow[name].copy_(state[name])

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The parameters hold the averaged weights inside the block, their own weights after."""
        saved = {name: p.detach().clone() for name, p in self.params.items()}
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(self.shadow[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in self.params.items():
                    p.copy_(saved[name])
