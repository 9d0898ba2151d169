"""What of a policy trains, how the optimizer groups it, and what a checkpoint stores.

A policy may implement any of these optional methods; the functions below fall back to the whole
module when it does not:

- ``trainable_parameters() -> list[(name, Parameter)]``: e.g. only LoRA adapters;
- ``param_groups() -> list[dict]``: optimizer parameter groups (own learning rates, no decay, ...);
- ``state_dict() / load_state_dict(state)``: the checkpoint's ``model`` entry (adapters only for an
  adapter run; :func:`trainable_state_dict` is the helper such a policy uses).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn


def trainable_parameters(policy: Any) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` of every parameter the optimizer updates."""
    if hasattr(policy, "trainable_parameters"):
        named = list(policy.trainable_parameters())
    else:
        named = [(n, p) for n, p in policy.module.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError(f"{type(policy).__name__} has no trainable parameter")
    return named


def param_groups(policy: Any) -> list[dict[str, Any]]:
    """The optimizer's parameter groups: the policy's own, or one group of all trainable parameters."""
    if hasattr(policy, "param_groups"):
        return list(policy.param_groups())
    return [{"params": [p for _, p in trainable_parameters(policy)]}]


def policy_state_dict(policy: Any) -> dict[str, Tensor]:
    """What a checkpoint stores of the policy."""
    return policy.state_dict() if hasattr(policy, "state_dict") else policy.module.state_dict()


def load_policy_state_dict(policy: Any, state: dict[str, Tensor]) -> None:
    """Inverse of :func:`policy_state_dict` (strict: a missing or unknown key is an error)."""
    if hasattr(policy, "load_state_dict"):
        policy.load_state_dict(state)
    else:
        policy.module.load_state_dict(state)


def trainable_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """The trainable parameters of ``module`` only (an adapter run's checkpoint)."""
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


def load_trainable_state_dict(module: nn.Module, state: dict[str, Tensor]) -> None:
    """Load :func:`trainable_state_dict` output back; the names must match the trainable set exactly."""
    params = {n: p for n, p in module.named_parameters() if p.requires_grad}
    missing, unknown = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    if missing or unknown:
        raise KeyError(f"trainable state mismatch: missing {missing[:5]}, unexpected {unknown[:5]}")
    for name, value in state.items():
        params[name].data.copy_(value)
