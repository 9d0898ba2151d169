"""Contracts between the engine and a domain: the rollout batch, reward output, policy and reward.

The engine never imports domain code. A domain (EDM molecules, Boltz structures, LM tokens)
implements :class:`Policy` and :class:`Reward`; everything that flows between them and the
engine is one of the two dataclasses below.

Shapes: ``B`` samples (trajectories) per rank, ``T`` steps per trajectory (denoising steps or
tokens), ``P`` prompts, ``K`` group size (``B = P * K``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from elign.engine.errors import ConfigError, check_finite
from elign.engine.losses import gaussian_step_kl


@dataclass
class Rollout:
    """A batch of sampled trajectories, recorded without gradients.

    Attributes:
        group_ids: ``[B]`` long; samples with the same id share a prompt (a GRPO group).
        logp_old: ``[B, T]`` log-probability of each recorded action under the sampling policy.
        step_mask: ``[B, T]`` bool; True where the step is trained (e.g. False on a shared prefix).
        payload: domain tensors whose leading dimension is ``B`` (latents, atoms, token ids, ...).
        group_payload: domain tensors whose leading dimension is ``P``, one row per group, computed
            once per prompt (e.g. a structure trunk's embeddings); ``group_ids`` index their rows,
            so they must lie in ``[0, P)``.
        info: batch-level values that are not per sample (e.g. step times); ``metrics`` (logged as
            they are) and ``counters`` (increments the trainer totals over ranks and iterations).
    """

    group_ids: Tensor
    logp_old: Tensor
    step_mask: Tensor
    payload: dict[str, Tensor] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    group_payload: dict[str, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        b, t = self.logp_old.shape
        if self.group_ids.shape != (b,):
            raise ValueError(f"group_ids must be [B]={b}, got {tuple(self.group_ids.shape)}")
        if self.step_mask.shape != (b, t):
            raise ValueError(f"step_mask must be [B, T]=({b}, {t}), got {tuple(self.step_mask.shape)}")
        for key, value in self.payload.items():
            if value.shape[0] != b:
                raise ValueError(f"payload[{key!r}] has leading dim {value.shape[0]}, expected B={b}")
        if self.group_payload:
            sizes = {key: value.shape[0] for key, value in self.group_payload.items()}
            p = next(iter(sizes.values()))
            if any(n != p for n in sizes.values()):
                raise ValueError(f"group_payload tensors must share their leading dim P; got {sizes}")
            if b and (int(self.group_ids.min()) < 0 or int(self.group_ids.max()) >= p):
                raise ValueError(f"with a group_payload of P={p} rows, group_ids must lie in [0, {p})")

    @property
    def batch_size(self) -> int:
        return self.logp_old.shape[0]

    @property
    def num_steps(self) -> int:
        return self.logp_old.shape[1]

    @property
    def num_groups(self) -> int:
        return int(self.group_ids.unique().numel())

    def select(self, index: Tensor) -> "Rollout":
        """Sub-batch of samples ``index`` (``[b]`` long); ``info`` is shared, not copied.

        With a ``group_payload``, the sub-batch keeps the rows of the groups it touches (in
        ascending group order) and its ``group_ids`` are renumbered to index them."""
        group_ids, group_payload = self.group_ids[index], self.group_payload
        if group_payload:
            groups, group_ids = torch.unique(group_ids, sorted=True, return_inverse=True)
            group_payload = {k: v[groups] for k, v in group_payload.items()}
        return replace(
            self,
            group_ids=group_ids,
            logp_old=self.logp_old[index],
            step_mask=self.step_mask[index],
            payload={k: v[index] for k, v in self.payload.items()},
            group_payload=group_payload,
        )


@dataclass
class StepLogProbs:
    """What :meth:`Policy.log_prob` returns for a micro-batch and step chunk.

    Attributes:
        logp: ``[b, t]`` log-probs of the recorded actions under the current policy (with grad).
        ref_logp: ``[b, t]`` the same under the reference policy (no grad), for sampled-action KL
            estimators (k3); None when not asked for or not available.
        mean, ref_mean: ``[b, t, ...]`` means of each step's Gaussian action distribution under the
            current and the reference policy, for the closed-form Gaussian KL; None otherwise.
        std: ``[b, t]`` the (shared, parameter-free) standard deviation of each step's Gaussian.
        event_mask: broadcastable to ``mean``; the action dimensions that exist (e.g. real atoms).
    """

    logp: Tensor
    ref_logp: Tensor | None = None
    mean: Tensor | None = None
    ref_mean: Tensor | None = None
    std: Tensor | None = None
    event_mask: Tensor | None = None

    def gaussian_kl(self) -> Tensor:
        """``[b, t]`` closed-form ``KL(pi_theta || pi_ref)`` of each step's Gaussian (shared std)."""
        if self.mean is None or self.ref_mean is None or self.std is None:
            raise ValueError("the policy returned no Gaussian means: use a sampled-action KL estimator (k3)")
        return gaussian_step_kl(self.mean, self.ref_mean, self.std, self.event_mask)


@dataclass
class RewardOutput:
    """Named reward channels for one rollout.

    Attributes:
        channels: name -> ``[B]`` terminal value per sample. NaN marks a sample whose evaluation
            failed; the engine replaces it by the configured penalty and counts it.
        potentials: name -> ``[B, T]`` shaping potentials (e.g. minus the energy of the predicted
            clean sample at step t), meaningful only where ``potential_mask`` is True.
            The terminal value of the same channel is ``channels[name]``.
        potential_mask: ``[T]`` bool, the steps at which potentials were evaluated.
        failures: reason -> number of samples that failed for it (logged as ``reward/failed_<reason>``).
        metrics: batch-level diagnostics (logged as ``reward/<name>``), e.g. stability fractions.
        keep: ``[B]`` bool or None; samples set False (e.g. duplicates) are dropped from the
            advantage statistics and from the loss.
    """

    channels: dict[str, Tensor]
    potentials: dict[str, Tensor] = field(default_factory=dict)
    potential_mask: Tensor | None = None
    failures: dict[str, int] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    keep: Tensor | None = None

    def __post_init__(self) -> None:
        if not self.channels:
            raise ValueError("a reward must emit at least one channel")
        sizes = {name: tuple(v.shape) for name, v in self.channels.items()}
        b = next(iter(self.channels.values())).shape[0]
        if any(s != (b,) for s in sizes.values()):
            raise ValueError(f"all channels must be [B]; got {sizes}")
        for name, pot in self.potentials.items():
            if name not in self.channels:
                raise ValueError(f"potential {name!r} has no terminal channel of the same name")
            if self.potential_mask is None or pot.shape != (b, self.potential_mask.shape[0]):
                raise ValueError(f"potential {name!r} must be [B, T] with a [T] potential_mask")

    @property
    def batch_size(self) -> int:
        return next(iter(self.channels.values())).shape[0]


@runtime_checkable
class Policy(Protocol):
    """A sampler whose recorded actions have exact, differentiable log-probabilities."""

    module: nn.Module
    """The trainable network: what the optimizer updates and checkpoints store."""

    def rollout(self, prompts: Any, group_size: int) -> Rollout:
        """Sample ``group_size`` trajectories per prompt, without gradients."""

    def log_prob(self, rollout: Rollout, steps: Tensor, with_reference: bool) -> StepLogProbs:
        """Log-probs ``[b, t]`` of the recorded actions at ``steps`` (``[t]`` long) with gradients,
        and, if ``with_reference``, the reference terms the KL estimators need (``ref_logp``,
        and for Gaussian policies the means and std)."""

    def distribute(self, wrap: Callable[[nn.Module], nn.Module]) -> None:
        """Route forward passes through ``wrap(module)`` (e.g. DistributedDataParallel)."""

    def to(self, device: torch.device) -> "Policy":
        """Move the policy (and its reference) to ``device``."""


@runtime_checkable
class PerSampleGradients(Protocol):
    """``G_i = sum_t d log p_{i,t} / d theta`` over the trained steps (``step_mask``) of each sample."""

    def accumulate(self, weights: Tensor) -> None:
        """Add ``sum_i weights[i] * G_i`` to the ``.grad`` of the policy's trainable parameters
        (``weights`` ``[B]``)."""


@runtime_checkable
class FusedPolicy(Policy, Protocol):
    """A policy that can backpropagate each step's log-prob while sampling (``trainer.fused_rollout``)."""

    def rollout_with_grads(self, prompts: Any, group_size: int) -> tuple[Rollout, PerSampleGradients]:
        """:meth:`Policy.rollout`, plus the per-sample log-prob gradients of the trained steps,
        taken at the current weights."""


@runtime_checkable
class Reward(Protocol):
    def __call__(self, rollout: Rollout) -> RewardOutput:
        """Score every sample of ``rollout``; never raises for one bad sample (NaN + reason)."""


@runtime_checkable
class Filter(Protocol):
    def __call__(self, rollout: Rollout, reward: RewardOutput) -> RewardOutput:
        """Inject penalties into the channels and/or mark samples to drop (``keep``)."""


@runtime_checkable
class PromptSource(Protocol):
    """An endless iterator of prompt batches; ``group_size`` samples are drawn per prompt, so each
    batch yields ``batch_size`` samples (per rank). Under torchrun the trainer calls an optional
    ``shard(rank, world_size)``; a source without it draws from torch's RNG, which each rank reseeds
    differently every iteration."""

    group_size: int
    batch_size: int

    def __iter__(self) -> Iterator[Any]: ...

    def __next__(self) -> Any: ...


class IdentityFilter:
    """No filtering: passes the reward output through (``filter=none``)."""

    def __call__(self, rollout: Rollout, reward: RewardOutput) -> RewardOutput:
        return reward


class ConstantReward:
    """Every sample gets the same value in every channel (``reward=dummy``): plumbing only,
    since all group-normalised advantages are then 0."""

    def __init__(self, values: dict[str, float], metrics: dict[str, float] | None = None) -> None:
        """
        Args:
            values: channel name -> constant reward value.
            metrics: constant diagnostics to report (e.g. ``{"stability": 1.0}``).
        """
        if not values:
            raise ConfigError("values", values, "at least one channel -> value")
        self.values = {str(k): check_finite(f"values.{k}", v) for k, v in dict(values).items()}
        self.metrics = {str(k): check_finite(f"metrics.{k}", v) for k, v in dict(metrics or {}).items()}

    def __call__(self, rollout: Rollout) -> RewardOutput:
        b = rollout.batch_size
        return RewardOutput(
            channels={k: torch.full((b,), v) for k, v in self.values.items()},
            metrics=dict(self.metrics),
        )
