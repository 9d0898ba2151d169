"""The strategy contracts: what the trainer hands a strategy, and what a strategy must provide.

A strategy is pure tensor maths. It owns how advantages are formed from scored rewards and how the
per-(sample, step) loss is aggregated (per token, per sequence, over the whole generation batch
across ranks). The trainer never divides by a count of its own: it hands the strategy the full
masks and the counts of the whole optimizer step (:class:`BatchCounts`), so the losses of the
micro-batches and step chunks of one optimizer step add up to exactly the loss of the whole batch.

Shapes: ``B`` samples of the rollout, ``b`` samples of one micro-batch, ``T`` steps of the rollout
(denoising steps or tokens), ``t`` steps of one chunk.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from torch import Tensor

from elign.engine.rollout import Rollout, StepLogProbs


@dataclass(frozen=True)
class BatchCounts:
    """Counts of the data that one optimizer step trains on.

    Attributes:
        tokens: trained (sample, step) pairs on this rank (the mask's sum over the step's samples).
        sequences: samples on this rank with at least one trained step.
        samples: samples on this rank in the optimizer step (``B`` of Dr. GRPO's ``B * T``).
        global_tokens: ``tokens`` summed over ranks.
        global_sequences: ``sequences`` summed over ranks.
        world_size: number of ranks (DDP averages gradients over them).
        max_steps: ``T``, the most steps a sample can have (max completion length for tokens).
    """

    tokens: float
    sequences: float
    samples: float
    global_tokens: float
    global_sequences: float
    world_size: int
    max_steps: int


@dataclass
class LossInputs:
    """One micro-batch and step chunk of an optimizer step.

    Attributes:
        logp: ``[b, t]`` log-probs of the recorded actions under the current policy (with grad).
        logp_old: ``[b, t]`` log-probs under the behaviour policy.
        advantages: ``[b, t]``.
        mask: ``[b, t]`` bool; trained pairs (step mask and ``keep``).
        seq_tokens: ``[b]`` trained steps of each sample over *all* ``T`` steps (the full mask's row
            sums), so a per-sequence mean is exact even when the chunk holds part of a sequence.
        counts: the counts of the whole optimizer step.
        reference: the policy's reference terms for the KL (``StepLogProbs`` with ``ref_logp`` and/or
            Gaussian means), or None when the strategy uses no KL.
        whole_sequences: True when ``t`` covers every trained step of the samples (one chunk).
    """

    logp: Tensor
    logp_old: Tensor
    advantages: Tensor
    mask: Tensor
    seq_tokens: Tensor
    counts: BatchCounts
    reference: StepLogProbs | None = None
    whole_sequences: bool = True


@dataclass
class ScoredRewards:
    """Reward channels after the engine's bookkeeping (:mod:`elign.engine.bookkeeping`).

    Attributes:
        channels: name -> ``[B]`` float64 terminal rewards; failures (NaN) already replaced by the
            configured penalty.
        potentials: name -> ``[B, T]`` shaping potentials, failures replaced likewise.
        potential_mask: ``[T]`` bool, the steps at which potentials were evaluated.
        keep: ``[B]`` bool; False drops a sample from the advantage statistics and the loss.
        failed: name -> ``[B]`` bool, the samples whose channel value was a failure.
    """

    channels: dict[str, Tensor]
    keep: Tensor
    potentials: dict[str, Tensor] = field(default_factory=dict)
    potential_mask: Tensor | None = None
    failed: dict[str, Tensor] = field(default_factory=dict)


@runtime_checkable
class RLStrategy(Protocol):
    """Advantages from scored rewards and the policy-gradient loss of one micro-batch."""

    kind: Literal["rl"]
    min_group_size: int
    """Smallest group (samples per prompt) the maths is defined for."""
    needs_whole_sequences: bool
    """True when a sample's loss depends on all its steps at once (GSPO's sequence ratio): the
    trainer then refuses a ``step_chunk_size`` that would cut a sequence."""
    uses_reference: bool
    """True when :meth:`loss` needs the policy's reference terms (a KL penalty)."""
    terminal_advantages: bool
    """True when each sample gets one advantage for all its steps (no per-step returns)."""

    def reward_weights(self, channels: list[str]) -> dict[str, float]:
        """Weight of each channel in the total reward (``reward/total``, zero-spread groups)."""

    def advantages(self, rewards: ScoredRewards, rollout: Rollout) -> tuple[Tensor, dict[str, float]]:
        """``[B, T]`` advantages (0 where ``keep`` is False) and advantage diagnostics."""

    def loss(self, batch: LossInputs) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss of one micro-batch and chunk, scaled so that the chunks of one optimizer step
        sum to the step's loss; and detached sums over trained pairs (``count``, ``loss``, ...)
        that the trainer adds up and divides by ``count`` into ``train/*`` means."""


@runtime_checkable
class SupervisedStrategy(Protocol):
    """The domain's own loss on a data batch (pretraining, SFT)."""

    kind: Literal["supervised"]
    min_group_size: int

    def loss(self, policy: Any, batch: Any) -> tuple[Tensor, dict[str, float]]:
        """The (mean) loss of ``batch`` and diagnostics logged as ``train/<name>``."""
