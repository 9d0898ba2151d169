"""The training loop shared by every domain: rollout -> reward -> filter -> advantages -> update."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from elign.engine.checkpoint import CheckpointManager, capture_rng, load_checkpoint, restore_rng
from elign.engine.distributed import DistInfo, average_gradients, reduce_mean
from elign.engine.ema import ParameterEMA
from elign.engine.errors import ConfigError
from elign.engine.losses import per_sample_coefficients
from elign.engine.metrics import MetricsWriter, NullLogger, PhaseTimer
from elign.engine.rollout import (Filter, FusedPolicy, IdentityFilter, PerSampleGradients, Policy, PromptSource,
                                  Reward, Rollout)

BEST_MODES = ("max", "min")
OLD_LOGP = ("rollout", "recompute")


def seed_iteration(seed: int, iteration: int, rank: int) -> None:
    """Reseed every RNG from (seed, iteration, rank): an iteration's randomness does not depend on
    what ran before it, which makes resumed runs replay the same rollouts."""
    s = (seed * 1_000_003 + iteration * 4099 + rank) % (2**63)
    random.seed(s)
    np.random.seed(s % (2**32))
    torch.manual_seed(s)


class Trainer:
    """Runs RL iterations for any domain that implements :class:`Policy` and :class:`Reward`."""

    def __init__(
        self,
        policy: Policy,
        strategy: Any,
        reward: Reward,
        dataloader: PromptSource,
        run_dir: str | Path,
        dist: DistInfo,
        optimizer: Callable[..., torch.optim.Optimizer],
        lr_schedule: Any,
        max_iterations: int,
        micro_batch_size: int,
        step_chunk_size: int | None,
        grad_accum_steps: int | None,
        inner_epochs: int,
        max_grad_norm: float | None,
        save_interval: int,
        best_metric: str | None,
        best_mode: str,
        resume: str | None,
        seed: int,
        progress: bool,
        ema_decay: float = 0.0,
        eval_interval: int = 0,
        old_logp: str = "recompute",
        fused_rollout: bool | str = False,
        filter: Filter | None = None,
        logger: Any = None,
        evaluator: Callable[[Any], dict[str, float]] | None = None,
        run_config: dict[str, Any] | None = None,
    ) -> None:
        """
        Args (the YAML keys; the objects before ``optimizer`` are passed by run.py):
            optimizer: partial optimizer class, called with the trainable parameters.
            lr_schedule: LR factor per optimizer step (``elign.engine.schedule``).
            max_iterations: RL iterations (rollout + update) in the run.
            micro_batch_size: samples per forward/backward.
            step_chunk_size: steps per forward/backward (bounds activation memory); None = all.
            grad_accum_steps: micro-batches per optimizer step; None = all of a rollout's (one
                on-policy step per iteration, so the ratio is exactly 1 and nothing is clipped).
            inner_epochs: passes over each rollout (PPO epochs).
            max_grad_norm: global gradient-norm clip per optimizer step; None = off.
            save_interval: write checkpoint_latest.pth every this many iterations (and at the end).
            best_metric: metric that selects checkpoint_best.pth; None = no best checkpoint.
            best_mode: "max" or "min".
            resume: None, "auto" (this run directory's latest checkpoint) or a checkpoint path.
            seed: base seed; every iteration reseeds from (seed, iteration, rank).
            progress: show a tqdm bar on rank 0.
            ema_decay: keep an exponential moving average of the weights (0 = off; EDM used 0.9999).
            eval_interval: run ``evaluator`` every this many iterations and at the end (0 = never).
            old_logp: PPO's behaviour log-probs. "rollout": those recorded while sampling.
                "recompute": those of the training forward before the update, so ratios are exact
                when sampling and training round differently (bfloat16 compute). Free when an
                iteration takes one optimizer step (the detached log-probs of the same forward),
                else one extra forward pass (no backward) before the update. Moot with
                ``fused_rollout`` (the update then differentiates the sampler's own forward).
            fused_rollout: the policy backpropagates each step's log-prob while sampling and keeps
                one gradient sum per sample; the update combines them with the advantages and needs
                no forward pass (~25 % fewer FLOPs per iteration). Needs a policy with
                ``rollout_with_grads``, one optimizer step per iteration, one advantage per sample
                (terminal mode) and no KL; memory grows by B copies of the parameters. True
                requires it, "auto" uses it where it applies (and says which on start-up).
        """
        for key, value, low in (("max_iterations", max_iterations, 1), ("micro_batch_size", micro_batch_size, 1),
                                ("grad_accum_steps", 1 if grad_accum_steps is None else grad_accum_steps, 1),
                                ("inner_epochs", inner_epochs, 1),
                                ("save_interval", save_interval, 1)):
            if int(value) < low:
                raise ConfigError(key, value, f"an integer >= {low}")
        if step_chunk_size is not None and step_chunk_size < 1:
            raise ConfigError("step_chunk_size", step_chunk_size, "an integer >= 1, or null for all steps")
        if best_mode not in BEST_MODES:
            raise ConfigError("best_mode", best_mode, BEST_MODES)
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ConfigError("max_grad_norm", max_grad_norm, "a number > 0, or null for no clipping")
        if not (ema_decay == 0 or 0 < ema_decay < 1):
            raise ConfigError("ema_decay", ema_decay, "0 (off) or a number in (0, 1)")
        if eval_interval < 0:
            raise ConfigError("eval_interval", eval_interval, "an integer >= 0 (0 = never)")
        if old_logp not in OLD_LOGP:
            raise ConfigError("old_logp", old_logp, OLD_LOGP)
        self.policy, self.strategy, self.reward, self.prompts = policy, strategy, reward, dataloader
        self.filter = filter or IdentityFilter()
        self.logger = logger or NullLogger()
        self.dist, self.run_dir, self.run_config = dist, Path(run_dir), run_config or {}
        self.max_iterations, self.micro_batch_size = int(max_iterations), int(micro_batch_size)
        self.step_chunk_size = step_chunk_size
        self.grad_accum_steps = None if grad_accum_steps is None else int(grad_accum_steps)
        self.inner_epochs, self.max_grad_norm = int(inner_epochs), max_grad_norm
        self.resume, self.seed, self.progress = resume, int(seed), progress
        self.group_size = int(dataloader.group_size)
        self.supervised = getattr(strategy, "kind", "rl") == "supervised"
        self.evaluator, self.eval_interval = evaluator, int(eval_interval)
        self.old_logp = old_logp
        if fused_rollout not in (True, False, "auto"):
            raise ConfigError("fused_rollout", fused_rollout, "true, false or auto")

        self.params = [p for p in policy.module.parameters() if p.requires_grad]
        self.optimizer = optimizer(self.params)
        self.total_optimizer_steps = self.max_iterations * self._optimizer_steps_per_iteration()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_schedule.bind(self.total_optimizer_steps))
        self.ddp: DistributedDataParallel | None = None
        if dist.enabled:
            self.ddp = DistributedDataParallel(policy.module, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)
            policy.distribute(lambda module: self.ddp)
        if dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.checkpoints = CheckpointManager(self.run_dir, save_interval, best_metric, best_mode, enabled=dist.is_main)
        self.writer = MetricsWriter(self.run_dir, enabled=dist.is_main)
        self.optimizer_steps = 0
        self.fused_rollout = self._resolve_fused(fused_rollout)
        self.ema = ParameterEMA(policy.module, ema_decay) if ema_decay > 0 else None

    def fit(self) -> dict[str, float]:
        """Run from the first (or resumed) iteration to ``max_iterations``; returns the last metrics."""
        start = self._restore()
        if self.dist.is_main:
            self.logger.start(str(self.run_dir), self.run_config, getattr(self.logger, "run_id", None))
        bar = tqdm(range(start, self.max_iterations), initial=start, total=self.max_iterations,
                   disable=not (self.progress and self.dist.is_main), desc="iterations", dynamic_ncols=True)
        metrics: dict[str, float] = {}
        for iteration in bar:
            seed_iteration(self.seed, iteration, self.dist.rank)
            timer = PhaseTimer()
            metrics = self._supervised_iteration(timer) if self.supervised else self._rl_iteration(timer)
            last = iteration + 1 == self.max_iterations
            if self.evaluator is not None and self.eval_interval and ((iteration + 1) % self.eval_interval == 0 or last):
                with timer.phase("eval"):
                    metrics.update(self._evaluate())
            metrics.update(timer.metrics())
            metrics = reduce_mean(metrics, self.dist)
            metrics.update({"iteration": iteration, "optimizer_step": self.optimizer_steps})
            self.writer.write(metrics)
            if self.dist.is_main:
                self.logger.log(metrics, step=iteration)
            self.checkpoints.save(self._state(iteration + 1), iteration + 1, metrics, last)
            bar.set_postfix({k.split("/")[-1]: f"{metrics[k]:.4g}" for k in
                             ("reward/total", "train/loss", "train/clip_frac") if k in metrics})
        if self.dist.is_main:
            self.logger.finish()
        return metrics

    # -- one iteration ------------------------------------------------------------------------

    def _rl_iteration(self, timer: PhaseTimer) -> dict[str, float]:
        """Rollout, reward, filter, advantages, clipped-surrogate update."""
        with timer.phase("rollout"):
            if self.fused_rollout:
                rollout, grads = self.policy.rollout_with_grads(next(self.prompts), self.group_size)
            else:
                rollout, grads = self.policy.rollout(next(self.prompts), self.group_size), None
        with timer.phase("reward"):
            reward = self.filter(rollout, self.reward(rollout))
            advantages, metrics = self.strategy.advantages(reward, rollout)
        with timer.phase("update"):
            metrics.update(self._update(rollout, advantages) if grads is None
                           else self._fused_update(rollout, advantages, grads))
        metrics.update(rollout.info.get("metrics", {}))
        metrics["rollout/samples_per_s"] = rollout.batch_size / max(timer.seconds["rollout"], 1e-9)
        return metrics

    def _supervised_iteration(self, timer: PhaseTimer) -> dict[str, float]:
        """One optimizer step on the domain's supervised loss."""
        with timer.phase("data"):
            batch = next(self.prompts)
        with timer.phase("update"):
            self.policy.module.train()
            loss, extra = self.strategy.loss(self.policy, batch)
            loss.backward()
            norm = self._optimizer_step()
        return {"train/loss": float(loss.detach()), "train/grad_norm": norm, "train/lr": self.scheduler.get_last_lr()[0],
                **{f"train/{k}": float(v) for k, v in extra.items()}}

    def _evaluate(self) -> dict[str, float]:
        """The evaluator on the EMA weights if any (what one would ship), else the raw weights."""
        self.policy.module.eval()
        with torch.random.fork_rng(), (self.ema.swapped_in() if self.ema else contextlib.nullcontext()):
            return {k if k.startswith("eval/") else f"eval/{k}": float(v) for k, v in self.evaluator(self.policy).items()}

    # -- update -------------------------------------------------------------------------------

    def _optimizer_steps_per_iteration(self) -> int:
        if self.supervised:
            return 1
        micro_batches = math.ceil(int(self.prompts.batch_size) / self.micro_batch_size)
        return math.ceil(micro_batches / (self.grad_accum_steps or micro_batches)) * self.inner_epochs

    def _sync(self, sync: bool) -> contextlib.AbstractContextManager:
        """Under DDP, all-reduce gradients only on the last backward before an optimizer step."""
        return contextlib.nullcontext() if (self.ddp is None or sync) else self.ddp.no_sync()

    def _update(self, rollout: Rollout, advantages: torch.Tensor) -> dict[str, float]:
        """Clipped-surrogate updates over micro-batches of samples and chunks of steps."""
        steps = torch.nonzero(rollout.step_mask.any(dim=0)).squeeze(1)
        if steps.numel() == 0:
            raise RuntimeError("rollout has no trained step (step_mask is all False)")
        chunks = steps.split(self.step_chunk_size or steps.numel())
        micro = torch.arange(rollout.batch_size, device=steps.device).split(self.micro_batch_size)
        sums: dict[str, float] = defaultdict(float)
        grad_norms: list[float] = []
        accum = self.grad_accum_steps or len(micro)
        self.policy.module.train()
        # With one optimizer step per iteration, every forward below runs at the sampling weights.
        single_step = self._optimizer_steps_per_iteration() == 1
        same_forward = self.old_logp == "recompute" and single_step
        if self.old_logp == "recompute" and not single_step:
            rollout = self._recompute_logp(rollout, micro, chunks, sums)
        for _ in range(self.inner_epochs):
            for first in range(0, len(micro), accum):
                group = micro[first:first + accum]
                denom = float(rollout.step_mask[torch.cat(group)].sum().clamp_min(1))
                for i, index in enumerate(group):
                    sub, sub_adv = rollout.select(index), advantages[index]
                    for j, cols in enumerate(chunks):
                        with self._sync(i == len(group) - 1 and j == len(chunks) - 1):
                            logp, kl = self.policy.log_prob(sub, cols, with_kl=self.strategy.uses_kl)
                            old = sub.logp_old[:, cols]
                            if single_step:
                                self._add_drift(sums, logp.detach(), old, sub.step_mask[:, cols])
                            if same_forward:
                                old = logp.detach()
                            loss, stats = self.strategy.loss(logp, old, sub_adv[:, cols],
                                                             sub.step_mask[:, cols], kl, denom)
                            loss.backward()
                        for key, value in stats.items():
                            sums[key] += float(value)
                grad_norms.append(self._optimizer_step())
        drift_count = sums.pop("drift_count", 0.0)
        drift = sums.pop("drift_sum", 0.0) / max(drift_count, 1.0)
        out = self._loss_means(sums)
        out["train/grad_norm"] = float(np.mean(grad_norms))
        out["train/lr"] = self.scheduler.get_last_lr()[0]
        if drift_count:
            out["train/logp_drift"] = drift
        return out

    def _resolve_fused(self, setting: bool | str) -> bool:
        """Whether to take the gradients while sampling: only where they are the update's (see __init__)."""
        if self.supervised or setting is False:
            return False
        needs = [("a policy with rollout_with_grads", not isinstance(self.policy, FusedPolicy)),
                 ("one optimizer step per iteration (grad_accum_steps: null, inner_epochs: 1)",
                  self._optimizer_steps_per_iteration() != 1),
                 ("strategy.kl_coef: 0", getattr(self.strategy, "uses_kl", False)),
                 ("strategy.advantage_mode: terminal",
                  getattr(self.strategy, "advantage_mode", "terminal") != "terminal")]
        missing = [what for what, failed in needs if failed]
        if missing and setting is True:
            raise ConfigError("fused_rollout", True, "false, or true with " + "; ".join(missing))
        if setting == "auto" and self.dist.is_main and self.progress:
            tqdm.write("fused_rollout=auto: " + ("on" if not missing else "off (needs " + "; ".join(missing) + ")"))
        return not missing

    def _fused_update(self, rollout: Rollout, advantages: torch.Tensor, grads: PerSampleGradients) -> dict[str, float]:
        """The one on-policy step from the gradients taken while sampling: the loss's
        ``d loss / d log p`` at ratio 1, one coefficient per sample, times each sample's gradient sum."""
        mask = rollout.step_mask
        logp = rollout.logp_old.detach().clone().requires_grad_(True)
        loss, stats = self.strategy.loss(logp, rollout.logp_old, advantages, mask, None, float(mask.sum().clamp_min(1)))
        loss.backward()
        try:
            coefficients = per_sample_coefficients(logp.grad, mask)
        except ValueError as err:  # e.g. a strategy with per-step advantages that auto did not foresee
            raise ConfigError("fused_rollout", True, f"false for this strategy ({err})") from err
        grads.accumulate(coefficients)
        average_gradients(self.params, self.dist)
        out = self._loss_means({k: float(v) for k, v in stats.items()})
        out["train/grad_norm"] = self._optimizer_step()
        out["train/lr"] = self.scheduler.get_last_lr()[0]
        return out

    @staticmethod
    def _loss_means(sums: dict[str, float]) -> dict[str, float]:
        """The strategy's per-pair sums as ``train/*`` means (``clipped`` -> ``clip_frac``, ``ratio`` -> ``ratio_mean``)."""
        count = max(sums.pop("count", 0.0), 1.0)
        out = {f"train/{k if k != 'clipped' else 'clip_frac'}": v / count for k, v in sums.items()}
        out["train/ratio_mean"] = out.pop("train/ratio", float("nan"))
        return out

    @staticmethod
    def _add_drift(sums: dict[str, float], logp: torch.Tensor, recorded: torch.Tensor, mask: torch.Tensor) -> None:
        """Accumulate ``|logp - recorded|`` over trained steps at the sampling weights
        (``train/logp_drift``: how far the sampler's numerics are from the training forward's)."""
        sums["drift_sum"] += float(((logp - recorded).abs() * mask).sum())
        sums["drift_count"] += float(mask.sum())

    def _recompute_logp(
        self, rollout: Rollout, micro: tuple[torch.Tensor, ...], chunks: tuple[torch.Tensor, ...],
        sums: dict[str, float],
    ) -> Rollout:
        """The rollout with ``logp_old`` replaced by the training forward's at the current weights,
        over the same micro-batches and step chunks as the update (same shapes, same rounding).
        Autograd stays on (each graph is dropped at once) so a policy runs the kernels it trains
        with, not its no-grad fast paths, which may round differently."""
        logp_old = rollout.logp_old.clone()
        with self._sync(False):  # no backward follows: skip DDP's per-forward reducer set-up
            for index in micro:
                sub = rollout.select(index)
                for cols in chunks:
                    logp = self.policy.log_prob(sub, cols, with_kl=False)[0].detach()
                    self._add_drift(sums, logp, sub.logp_old[:, cols], sub.step_mask[:, cols])
                    logp_old[index[:, None], cols[None, :]] = logp
        return dataclasses.replace(rollout, logp_old=logp_old)

    def _optimizer_step(self) -> float:
        if self.max_grad_norm is not None:
            norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm))
        else:
            norm = float(torch.norm(torch.stack([p.grad.norm() for p in self.params if p.grad is not None])))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.optimizer_steps += 1
        if self.ema is not None:
            self.ema.update()
        return norm

    # -- checkpoints --------------------------------------------------------------------------

    def _state(self, next_iteration: int) -> dict[str, Any]:
        return {
            "iteration": next_iteration,
            "optimizer_steps": self.optimizer_steps,
            "model": self.policy.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": capture_rng(),
            "logger": {"run_id": getattr(self.logger, "run_id", None)},
            **({"ema": self.ema.state_dict()} if self.ema is not None else {}),
            **({"dataloader": self.prompts.state_dict()} if hasattr(self.prompts, "state_dict") else {}),
        }

    def _restore(self) -> int:
        """Load the resume checkpoint if any; returns the first iteration to run."""
        path = self.checkpoints.resolve_resume(self.resume)
        if path is None:
            return 0
        state = load_checkpoint(path, map_location=self.dist.device)
        self.policy.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.optimizer_steps = int(state["optimizer_steps"])
        if self.ema is not None:
            if "ema" not in state:
                raise KeyError(f"{path} has no EMA weights but trainer.ema_decay > 0")
            self.ema.load_state_dict(state["ema"])
        if "dataloader" in state and hasattr(self.prompts, "load_state_dict"):
            self.prompts.load_state_dict(state["dataloader"])
        restore_rng(state["rng"])
        self.checkpoints.best_value = state.get("best_value")
        run_id = state.get("logger", {}).get("run_id")
        if run_id is not None:
            self.logger.run_id = run_id
        start = int(state["iteration"])
        self.writer.truncate_from(start)
        if self.dist.is_main:
            tqdm.write(f"resumed from {path} at iteration {start}")
        return start
