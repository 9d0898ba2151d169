"""The update paths beside the loop: replayed policy-gradient update, update from gradients taken
while sampling, and the supervised update. Each takes what one iteration produced and returns its
``train/*`` metrics; the optimizer step itself (clipping, schedule, EMA) is :class:`OptimizerStep`."""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections import defaultdict
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import Tensor

from elign.engine.distributed import DistInfo, all_reduce_sum, average_gradients
from elign.engine.ema import ParameterEMA
from elign.engine.errors import ConfigError
from elign.engine.losses import per_sample_coefficients
from elign.engine.rollout import FusedPolicy, PerSampleGradients, Rollout
from elign.engine.strategies.base import BatchCounts, LossInputs, RLStrategy

OLD_LOGP = ("rollout", "recompute")


class GradientSync:
    """Under DDP, all-reduce gradients only on the last backward before an optimizer step:
    ``with sync(last): loss.backward()``. A plain object (not a bound method of the trainer), so
    the update paths hold no reference cycle through the trainer that would keep DDP, and with it
    the process group, alive until a garbage collection."""

    def __init__(self) -> None:
        self.ddp: Any = None

    def __call__(self, sync: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if (self.ddp is None or sync) else self.ddp.no_sync()


SyncContext = Callable[[bool], contextlib.AbstractContextManager]


class OptimizerStep:
    """Gradient-norm clip, optimizer and LR-schedule step, zeroing, EMA update; counts the steps."""

    def __init__(self, params: list[Tensor], optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, max_grad_norm: float | None,
                 ema: ParameterEMA | None) -> None:
        self.params, self.optimizer, self.scheduler = params, optimizer, scheduler
        self.max_grad_norm, self.ema = max_grad_norm, ema
        self.count = 0

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def __call__(self) -> float:
        """Step; returns the gradient norm before clipping."""
        if self.max_grad_norm is not None:
            norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm))
        else:
            norm = float(torch.norm(torch.stack([p.grad.norm() for p in self.params if p.grad is not None])))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.count += 1
        if self.ema is not None:
            self.ema.update()
        return norm


def batch_counts(mask: Tensor, dist: DistInfo) -> BatchCounts:
    """The :class:`BatchCounts` of one optimizer step whose samples on this rank have ``mask`` ``[b, T]``."""
    tokens, sequences = float(mask.sum()), float(mask.any(dim=1).sum())
    global_tokens, global_sequences = all_reduce_sum([tokens, sequences], dist)
    return BatchCounts(tokens=tokens, sequences=sequences, samples=float(mask.shape[0]),
                       global_tokens=global_tokens, global_sequences=global_sequences,
                       world_size=dist.world_size, max_steps=int(mask.shape[1]))


def global_sums(sums: dict[str, float], dist: DistInfo) -> dict[str, float]:
    """A strategy's per-pair sums added over ranks (one collective), so ``train/*`` means are means
    over the pairs of every rank, not a mean of per-rank means (ranks hold unequal numbers of tokens)."""
    keys = sorted(sums)
    return dict(zip(keys, all_reduce_sum([float(sums[k]) for k in keys], dist)))


# Per-pair means logged under TRL's GRPOTrainer names (same quantity, so the same name).
TRL_NAMES = {"clipped_low": "clip_ratio/low_mean", "clipped_high": "clip_ratio/high_mean"}


def loss_means(sums: dict[str, float]) -> dict[str, float]:
    """A strategy's per-pair sums as means: ``train/<key>``, with ``clipped`` -> ``train/clip_frac``
    (also TRL's ``clip_ratio/region_mean`` when the strategy splits it into low / high),
    ``ratio`` -> ``train/ratio_mean`` and the low / high clip shares under TRL's names."""
    count = max(sums.pop("count", 0.0), 1.0)
    out = {TRL_NAMES.get(k) or f"train/{k if k != 'clipped' else 'clip_frac'}": v / count for k, v in sums.items()}
    out["train/ratio_mean"] = out.pop("train/ratio", float("nan"))
    if "clip_ratio/low_mean" in out and "train/clip_frac" in out:
        out["clip_ratio/region_mean"] = out["train/clip_frac"]
    return out


def micro_batches(batch_size: int, micro_batch_size: int, group_size: int, grouped: bool) -> tuple[Tensor, ...]:
    """Sample indices of each micro-batch. With per-group payload the splits must keep whole groups
    (samples of a group are consecutive), so each micro-batch carries its groups' rows once."""
    if grouped and micro_batch_size % group_size:
        raise ConfigError("trainer.micro_batch_size", micro_batch_size,
                          f"a multiple of the group size {group_size} (the rollout carries per-group payload)")
    return torch.arange(batch_size).split(micro_batch_size)


class ReplayedUpdate:
    """Clipped-surrogate updates over micro-batches of samples and chunks of steps, recomputing the
    log-probs of the recorded actions with gradients (PPO epochs, gradient accumulation)."""

    def __init__(self, policy: Any, strategy: RLStrategy, step: OptimizerStep, dist: DistInfo, sync: SyncContext,
                 micro_batch_size: int, step_chunk_size: int | None, grad_accum_steps: int | None,
                 inner_epochs: int, old_logp: str, group_size: int) -> None:
        if old_logp not in OLD_LOGP:
            raise ConfigError("old_logp", old_logp, OLD_LOGP)
        if strategy.needs_whole_sequences and step_chunk_size is not None:
            raise ConfigError("step_chunk_size", step_chunk_size,
                              f"null: {type(strategy).__name__} needs whole sequences in one forward "
                              "(a sequence-level ratio cannot be split into chunks of steps)")
        self.policy, self.strategy, self.step, self.dist, self.sync = policy, strategy, step, dist, sync
        self.micro_batch_size, self.step_chunk_size = micro_batch_size, step_chunk_size
        self.grad_accum_steps, self.inner_epochs = grad_accum_steps, inner_epochs
        self.old_logp, self.group_size = old_logp, group_size

    def optimizer_steps(self, batch_size: int) -> int:
        """Optimizer steps one iteration of ``batch_size`` samples takes."""
        micro = math.ceil(batch_size / self.micro_batch_size)
        return math.ceil(micro / (self.grad_accum_steps or micro)) * self.inner_epochs

    def __call__(self, rollout: Rollout, advantages: Tensor) -> dict[str, float]:
        steps = torch.nonzero(rollout.step_mask.any(dim=0)).squeeze(1)
        if steps.numel() == 0:
            raise RuntimeError("rollout has no trained step (step_mask is all False)")
        chunks = steps.split(self.step_chunk_size or steps.numel())
        micro = micro_batches(rollout.batch_size, self.micro_batch_size, self.group_size, bool(rollout.group_payload))
        sums: dict[str, float] = defaultdict(float)
        grad_norms: list[float] = []
        accum = self.grad_accum_steps or len(micro)
        self.policy.module.train()
        # With one optimizer step per iteration, every forward below runs at the sampling weights.
        single_step = self.optimizer_steps(rollout.batch_size) == 1
        same_forward = self.old_logp == "recompute" and single_step
        if self.old_logp == "recompute" and not single_step:
            rollout = self._recompute_logp(rollout, micro, chunks, sums)
        reference = self.strategy.uses_reference
        for _ in range(self.inner_epochs):
            for first in range(0, len(micro), accum):
                group = micro[first:first + accum]
                counts = batch_counts(rollout.step_mask[torch.cat(group)], self.dist)
                for i, index in enumerate(group):
                    sub, sub_adv = rollout.select(index), advantages[index]
                    seq_tokens = sub.step_mask.sum(dim=1)
                    for j, cols in enumerate(chunks):
                        with self.sync(i == len(group) - 1 and j == len(chunks) - 1):
                            out = self.policy.log_prob(sub, cols, with_reference=reference)
                            old = sub.logp_old[:, cols]
                            if single_step:
                                add_drift(sums, out.logp.detach(), old, sub.step_mask[:, cols])
                            if same_forward:
                                old = out.logp.detach()
                            loss, stats = self.strategy.loss(LossInputs(
                                logp=out.logp, logp_old=old, advantages=sub_adv[:, cols], mask=sub.step_mask[:, cols],
                                seq_tokens=seq_tokens, counts=counts, reference=out if reference else None,
                                whole_sequences=len(chunks) == 1))
                            loss.backward()
                        for key, value in stats.items():
                            sums[key] += float(value)
                grad_norms.append(self.step())
        sums = global_sums(sums, self.dist)
        drift_count = sums.pop("drift_count", 0.0)
        drift = sums.pop("drift_sum", 0.0) / max(drift_count, 1.0)
        out_metrics = loss_means(sums)
        out_metrics["train/grad_norm"] = float(np.mean(grad_norms))
        out_metrics["train/lr"] = self.step.lr
        if drift_count:
            out_metrics["train/logp_drift"] = drift
        return out_metrics

    def _recompute_logp(self, rollout: Rollout, micro: tuple[Tensor, ...], chunks: tuple[Tensor, ...],
                        sums: dict[str, float]) -> Rollout:
        """The rollout with ``logp_old`` replaced by the training forward's at the current weights,
        over the same micro-batches and step chunks as the update (same shapes, same rounding).
        Autograd stays on (each graph is dropped at once) so a policy runs the kernels it trains
        with, not its no-grad fast paths, which may round differently."""
        logp_old = rollout.logp_old.clone()
        with self.sync(False):  # no backward follows: skip DDP's per-forward reducer set-up
            for index in micro:
                sub = rollout.select(index)
                for cols in chunks:
                    logp = self.policy.log_prob(sub, cols, with_reference=False).logp.detach()
                    add_drift(sums, logp, sub.logp_old[:, cols], sub.step_mask[:, cols])
                    logp_old[index[:, None], cols[None, :]] = logp
        return dataclasses.replace(rollout, logp_old=logp_old)


def add_drift(sums: dict[str, float], logp: Tensor, recorded: Tensor, mask: Tensor) -> None:
    """Accumulate ``|logp - recorded|`` over trained steps at the sampling weights
    (``train/logp_drift``: how far the sampler's numerics are from the training forward's)."""
    sums["drift_sum"] += float(torch.where(mask.bool(), (logp - recorded).abs(), torch.zeros_like(logp)).sum())
    sums["drift_count"] += float(mask.sum())


class FusedUpdate:
    """The one on-policy step from the gradients taken while sampling: the loss's
    ``d loss / d log p`` at ratio 1, one coefficient per sample, times each sample's gradient sum."""

    def __init__(self, strategy: RLStrategy, step: OptimizerStep, dist: DistInfo) -> None:
        self.strategy, self.step, self.dist = strategy, step, dist

    def __call__(self, rollout: Rollout, advantages: Tensor, grads: PerSampleGradients) -> dict[str, float]:
        mask = rollout.step_mask
        logp = rollout.logp_old.detach().clone().requires_grad_(True)
        loss, stats = self.strategy.loss(LossInputs(
            logp=logp, logp_old=rollout.logp_old, advantages=advantages, mask=mask, seq_tokens=mask.sum(dim=1),
            counts=batch_counts(mask, self.dist)))
        loss.backward()
        try:
            coefficients = per_sample_coefficients(logp.grad, mask)
        except ValueError as err:  # e.g. a strategy with per-step advantages that auto did not foresee
            raise ConfigError("trainer.fused_rollout", True, f"false for this strategy ({err})") from err
        grads.accumulate(coefficients)
        average_gradients(self.step.params, self.dist)
        out = loss_means(global_sums({k: float(v) for k, v in stats.items()}, self.dist))
        out["train/grad_norm"] = self.step()
        out["train/lr"] = self.step.lr
        return out


def fused_applies(setting: bool | str, policy: Any, strategy: Any, optimizer_steps: int) -> tuple[bool, list[str]]:
    """Whether to take the gradients while sampling (``trainer.fused_rollout``): only where they are
    the update's. Returns the decision and what is missing for it."""
    if setting not in (True, False, "auto"):
        raise ConfigError("fused_rollout", setting, "true, false or auto")
    if setting is False or getattr(strategy, "kind", "rl") != "rl":
        return False, []
    needs = [("a policy with rollout_with_grads", not isinstance(policy, FusedPolicy)),
             ("one optimizer step per iteration (grad_accum_steps: null, inner_epochs: 1)", optimizer_steps != 1),
             ("a strategy without KL (e.g. strategy.kl_coef: 0)", strategy.uses_reference),
             ("one advantage per sample (e.g. strategy.advantage_mode: terminal)", not strategy.terminal_advantages)]
    missing = [what for what, failed in needs if failed]
    if missing and setting is True:
        raise ConfigError("fused_rollout", True, "false, or true with " + "; ".join(missing))
    return not missing, missing


class SupervisedUpdate:
    """One optimizer step on the domain's supervised loss over ``grad_accum_steps`` batches (DDP
    synchronises on the last).

    Each batch's loss is a mean over its own items. By default each is scaled by ``1 / grad_accum_steps``
    (a mean of means, exact when every batch holds as many items). A policy whose batches hold unequal
    counts (packed token rows: tail padding, ``-100`` labels) exposes ``supervised_weight(batch)``, the
    number its loss averages over; then batch ``i`` of every rank is weighted ``W n_i / N`` (``N`` summed
    over all batches of all ``W`` ranks, one all-reduce), so that after DDP's gradient average the step
    is that of the global mean over all ``N`` items: exactly one process's step on the same data.
    """

    def __init__(self, policy: Any, strategy: Any, step: OptimizerStep, sync: SyncContext,
                 grad_accum_steps: int | None, dist: DistInfo | None = None) -> None:
        self.policy, self.strategy, self.step, self.sync = policy, strategy, step, sync
        self.grad_accum_steps = grad_accum_steps or 1
        self.dist = dist

    def weights(self, batches: list[Any]) -> list[float]:
        """Loss weight of each of this rank's batches (see the class docstring)."""
        count = getattr(self.policy, "supervised_weight", None)
        if count is None:
            return [1.0 / len(batches)] * len(batches)
        counts = [float(count(batch)) for batch in batches]
        world = self.dist.world_size if self.dist is not None and self.dist.enabled else 1
        total = all_reduce_sum([sum(counts)], self.dist)[0] if world > 1 else sum(counts)
        return [world * c / total if total > 0 else 0.0 for c in counts]

    def __call__(self, batches: Iterator[Any]) -> dict[str, float]:
        self.policy.module.train()
        drawn = [next(batches) for _ in range(self.grad_accum_steps)]
        weights = self.weights(drawn)
        sums: dict[str, float] = defaultdict(float)
        for i, (batch, weight) in enumerate(zip(drawn, weights)):
            with self.sync(i == self.grad_accum_steps - 1):
                loss, extra = self.strategy.loss(self.policy, batch)
                (loss * weight).backward()
            sums["loss"] += float(loss.detach()) * weight
            for key, value in extra.items():
                sums[key] += float(value) if key in THROUGHPUT else float(value) / self.grad_accum_steps
        norm = self.step()
        return {"train/grad_norm": norm, "train/lr": self.step.lr, **{f"train/{k}": v for k, v in sums.items()}}


THROUGHPUT = ("num_samples", "num_tokens")
"""Counts a supervised loss may report; they are summed over the accumulated batches, and the
trainer turns them into ``train/samples_per_s`` and ``train/tokens_per_s``."""
