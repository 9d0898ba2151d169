"""The training loop shared by every domain: rollout -> reward -> filter -> advantages -> update.

The loop (:meth:`Trainer.fit`) chooses none of the update's details: those are the update paths of
:mod:`elign.engine.updates`, the reward bookkeeping of :mod:`elign.engine.bookkeeping` and the
strategy's maths.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from elign.engine.bookkeeping import RewardBook
from elign.engine.checkpoint import CheckpointManager, capture_rng, load_checkpoint, restore_rng
from elign.engine.distributed import DistInfo, all_reduce_sum, reduce_mean
from elign.engine.ema import ParameterEMA
from elign.engine.errors import ConfigError, check_int, check_range
from elign.engine.metrics import MetricsWriter, NullLogger, PhaseTimer
from elign.engine.progress import Progress
from elign.engine.policy_state import load_policy_state_dict, param_groups, policy_state_dict, trainable_parameters
from elign.engine.rollout import Filter, IdentityFilter, Policy, PromptSource, Reward
from elign.engine.tables import SampleTable
from elign.engine.updates import (THROUGHPUT, FusedUpdate, GradientSync, OptimizerStep, ReplayedUpdate,
                                  SupervisedUpdate, fused_applies)

BEST_MODES = ("max", "min")
DDP_OPTIONS = ("find_unused_parameters", "static_graph", "gradient_as_bucket_view")


def seed_iteration(seed: int, iteration: int, rank: int) -> None:
    """Reseed every RNG from (seed, iteration, rank): an iteration's randomness does not depend on
    what ran before it, which makes resumed runs replay the same rollouts."""
    s = (seed * 1_000_003 + iteration * 4099 + rank) % (2**63)
    random.seed(s)
    np.random.seed(s % (2**32))
    torch.manual_seed(s)


class Trainer:
    """Runs RL or supervised iterations for any domain that implements the engine's contracts."""

    def __init__(
        self,
        policy: Policy,
        strategy: Any,
        reward: Reward | None,
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
        eval_at_start: bool = True,
        old_logp: str = "recompute",
        fused_rollout: bool | str = False,
        failure_penalty: float = -1.0,
        ddp: dict[str, bool] | None = None,
        sample_table_interval: int = 0,
        sample_table_rows: int = 64,
        filter: Filter | None = None,
        logger: Any = None,
        evaluator: Callable[[Any], dict[str, float]] | None = None,
        run_config: dict[str, Any] | None = None,
    ) -> None:
        """
        Args (the YAML keys; the objects before ``optimizer`` are passed by run.py; ``reward`` and
        ``filter`` may be None for a supervised strategy):
            optimizer: partial optimizer class, called with the policy's parameter groups.
            lr_schedule: LR factor per optimizer step (``elign.engine.schedule``).
            max_iterations: iterations (RL: rollout + update; supervised: one optimizer step).
            micro_batch_size: samples per forward/backward (RL).
            step_chunk_size: steps per forward/backward (bounds activation memory); None = all.
            grad_accum_steps: RL: micro-batches per optimizer step, None = all of a rollout's (one
                on-policy step per iteration, so the ratio is exactly 1 and nothing is clipped).
                Supervised: data batches per optimizer step, None = 1.
            inner_epochs: passes over each rollout (PPO epochs).
            max_grad_norm: global gradient-norm clip per optimizer step; None = off.
            save_interval: write checkpoint_latest.pth every this many iterations (and at the end).
            best_metric: metric that selects checkpoint_best.pth; None = no best checkpoint.
            best_mode: "max" or "min".
            resume: None, "auto" (this run directory's latest checkpoint) or a checkpoint path.
            seed: base seed; every iteration reseeds from (seed, iteration, rank).
            progress: show progress on rank 0 (a tqdm bar on a terminal, a line every ~5 % in a log).
            ema_decay: exponential moving average of the trainable weights (0 = off).
            eval_interval: run ``evaluator`` every this many iterations and at the end (0 = never).
            eval_at_start: with ``eval_interval``, also evaluate the starting weights before the first
                update of a fresh run, logged as iteration -1, so every ``eval/*`` curve starts at
                the model that was post-trained.
            old_logp: PPO's behaviour log-probs, "rollout" (recorded while sampling) or "recompute"
                (the training forward's before the update; see ``ReplayedUpdate``).
            fused_rollout: take per-sample log-prob gradients while sampling so the update needs no
                forward pass (``FusedUpdate``): True, False or "auto" (where it applies).
            failure_penalty: reward of a sample whose evaluation failed (NaN), in every channel.
            ddp: DistributedDataParallel options (find_unused_parameters, static_graph,
                gradient_as_bucket_view); None = torch's defaults.
            sample_table_interval: RL: write a table of prompts, completions, rewards and advantages
                every N iterations (``samples/``, and the logger's table); 0 = never.
            sample_table_rows: samples per table.
        """
        max_iterations, micro_batch_size = check_int("max_iterations", max_iterations, 1), check_int("micro_batch_size", micro_batch_size, 1)
        inner_epochs, save_interval = check_int("inner_epochs", inner_epochs, 1), check_int("save_interval", save_interval, 1)
        step_chunk_size = check_int("step_chunk_size", step_chunk_size, 1, allow_none=True, none_means="all steps")
        grad_accum_steps = check_int("grad_accum_steps", grad_accum_steps, 1, allow_none=True,
                                     none_means="a rollout's micro-batches (RL) or 1 (supervised)")
        seed, eval_interval = check_int("seed", seed), check_int("eval_interval", eval_interval, 0)
        max_grad_norm = check_range("max_grad_norm", max_grad_norm, 0, low_open=True, allow_none=True, none_means="no clipping")
        if best_mode not in BEST_MODES:
            raise ConfigError("best_mode", best_mode, BEST_MODES)
        if not (ema_decay == 0 or 0 < ema_decay < 1):
            raise ConfigError("ema_decay", ema_decay, "0 (off) or a number in (0, 1)")
        ddp = dict(ddp or {})
        if set(ddp) - set(DDP_OPTIONS):
            raise ConfigError("ddp", sorted(set(ddp) - set(DDP_OPTIONS)), DDP_OPTIONS)
        self.policy, self.strategy, self.reward, self.prompts = policy, strategy, reward, dataloader
        if reward is None and getattr(strategy, "kind", "rl") == "rl":
            raise ValueError(f"{type(strategy).__name__} is an RL strategy: the trainer needs a reward")
        self.filter = filter or IdentityFilter()
        self.logger = logger or NullLogger()
        self.dist, self.run_dir, self.run_config = dist, Path(run_dir), run_config or {}
        self.max_iterations, self.resume, self.seed, self.progress = max_iterations, resume, seed, progress
        self.display = Progress(show=progress, is_main=dist.is_main)  # a bar on a terminal, lines in a log
        self.group_size = int(dataloader.group_size)
        self.supervised = getattr(strategy, "kind", "rl") == "supervised"
        self.evaluator, self.eval_interval = evaluator, int(eval_interval)
        if not isinstance(eval_at_start, bool):
            raise ConfigError("eval_at_start", eval_at_start, "true or false")
        self.eval_at_start = eval_at_start
        self.rewards = RewardBook(failure_penalty)
        if dist.enabled and hasattr(dataloader, "shard"):
            dataloader.shard(dist.rank, dist.world_size)
        elif self.supervised and dist.enabled:  # RL prompt sources without shard() differ by the per-rank reseed
            raise ConfigError("dataloader", type(dataloader).__name__, "a data source with shard(rank, world_size) "
                              "under torchrun (each rank must see different samples)")

        self.sync = GradientSync()
        self.counters: dict[str, float] = {}
        named = trainable_parameters(policy)
        self.optimizer = optimizer(param_groups(policy))
        self.ema = ParameterEMA(named, ema_decay) if ema_decay > 0 else None
        self.replay = ReplayedUpdate(policy, strategy, None, dist, self.sync, int(micro_batch_size), step_chunk_size,
                                     grad_accum_steps, int(inner_epochs), old_logp, self.group_size) \
            if not self.supervised else None
        steps_per_iteration = 1 if self.supervised else self.replay.optimizer_steps(int(dataloader.batch_size))
        self.total_optimizer_steps = self.max_iterations * steps_per_iteration
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_schedule.bind(self.total_optimizer_steps))
        self.step = OptimizerStep([p for _, p in named], self.optimizer, self.scheduler, max_grad_norm, self.ema)
        if self.supervised:
            self.supervised_update = SupervisedUpdate(policy, strategy, self.step, self.sync, grad_accum_steps, dist)
        else:
            self.replay.step = self.step
            self.fused, missing = fused_applies(fused_rollout, policy, strategy, steps_per_iteration)
            self.fused_update = FusedUpdate(strategy, self.step, dist)
            if fused_rollout == "auto":
                self.display.write("fused_rollout=auto: " + ("on" if self.fused else "off (needs " + "; ".join(missing) + ")"))
        self.ddp: DistributedDataParallel | None = None
        if dist.enabled:
            self.ddp = DistributedDataParallel(policy.module, device_ids=[dist.device.index] if dist.device.type == "cuda"
                                               else None, **ddp)
            ddp_module = self.sync.ddp = self.ddp
            policy.distribute(lambda module: ddp_module)
        if dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.checkpoints = CheckpointManager(self.run_dir, save_interval, best_metric, best_mode, enabled=dist.is_main)
        self.writer = MetricsWriter(self.run_dir, enabled=dist.is_main)
        self.tables = SampleTable(self.run_dir, sample_table_interval, sample_table_rows, enabled=dist.is_main)

    @property
    def optimizer_steps(self) -> int:
        return self.step.count

    def fit(self) -> dict[str, float]:
        """Run from the first (or resumed) iteration to ``max_iterations``; returns the last metrics."""
        start = self._restore()
        if self.dist.is_main:
            self.logger.start(str(self.run_dir), self.run_config, getattr(self.logger, "run_id", None))
        self.display.start(total=self.max_iterations, initial=start)
        if start == 0 and self.eval_at_start and self.evaluator is not None and self.eval_interval:
            self._log_initial_evaluation()
        metrics: dict[str, float] = {}
        for iteration in range(start, self.max_iterations):
            seed_iteration(self.seed, iteration, self.dist.rank)
            timer = PhaseTimer()
            metrics = self._supervised_iteration(timer) if self.supervised else self._rl_iteration(timer, iteration)
            metrics.update(self._data_metrics())
            last = iteration + 1 == self.max_iterations
            if self.evaluator is not None and self.eval_interval and ((iteration + 1) % self.eval_interval == 0 or last):
                with timer.phase("eval"):
                    metrics.update(self._evaluate())
            metrics = self._record({**metrics, **timer.metrics()}, iteration)
            self.checkpoints.save(self._state(iteration + 1), iteration + 1, metrics, last)
            self.display.update(iteration, metrics)
        self.display.close()
        if self.dist.is_main:
            self.logger.finish()
        return metrics

    # -- one iteration ------------------------------------------------------------------------

    def _rl_iteration(self, timer: PhaseTimer, iteration: int) -> dict[str, float]:
        """Rollout, reward, bookkeeping, advantages, (sample table), update."""
        with timer.phase("rollout"):
            if self.fused:
                rollout, grads = self.policy.rollout_with_grads(next(self.prompts), self.group_size)
            else:
                rollout, grads = self.policy.rollout(next(self.prompts), self.group_size), None
        with timer.phase("reward"):
            scored, metrics = self.rewards(self.filter(rollout, self.reward(rollout)), rollout,
                                           self.strategy.reward_weights)
            if not scored.keep.all():  # dropped samples leave the loss as well as the statistics
                rollout = dataclasses.replace(rollout, step_mask=rollout.step_mask & scored.keep.unsqueeze(1))
            advantages, adv_metrics = self.strategy.advantages(scored, rollout)
            metrics.update(adv_metrics)
        self.tables(iteration, rollout, scored, advantages, self.logger)
        with timer.phase("update"):
            metrics.update(self.replay(rollout, advantages) if grads is None
                           else self.fused_update(rollout, advantages, grads))
        metrics.update(rollout.info.get("metrics", {}))
        metrics.update(self._count(rollout.info.get("counters", {})))
        metrics["rollout/samples_per_s"] = rollout.batch_size / max(timer.seconds["rollout"], 1e-9)
        return metrics

    def _count(self, increments: dict[str, float]) -> dict[str, float]:
        """Running totals over ranks and iterations (e.g. TRL's ``num_tokens``) of a rollout's
        ``info["counters"]``; they live in the checkpoint, so a resumed run continues them."""
        keys = sorted(increments)
        for key, value in zip(keys, all_reduce_sum([float(increments[k]) for k in keys], self.dist)):
            self.counters[key] = self.counters.get(key, 0.0) + value
        return {key: self.counters[key] for key in keys}

    def _supervised_iteration(self, timer: PhaseTimer) -> dict[str, float]:
        """One optimizer step on the domain's supervised loss (data loading is timed inside it)."""
        start = time.perf_counter()
        with timer.phase("update"):
            metrics = self.supervised_update(self.prompts)
        seconds = max(time.perf_counter() - start, 1e-9)
        for key in THROUGHPUT:
            if f"train/{key}" in metrics:
                metrics[f"train/{key.removeprefix('num_')}_per_s"] = metrics.pop(f"train/{key}") / seconds
        return metrics

    def _data_metrics(self) -> dict[str, float]:
        """The data source's own counters (e.g. packed units, skipped lines, epoch) if it keeps any."""
        metrics = getattr(self.prompts, "metrics", None)
        return dict(metrics()) if callable(metrics) else {}

    def _log_initial_evaluation(self) -> None:
        """The starting weights' evaluation as iteration -1 (no checkpoint: nothing was trained)."""
        timer = PhaseTimer()
        with timer.phase("eval"):
            metrics = self._evaluate()
        self._record({**metrics, **timer.metrics()}, -1)

    def _record(self, metrics: dict[str, float], iteration: int) -> dict[str, float]:
        """Average over ranks, then one metrics.jsonl line and one logger step (rank 0 writes)."""
        metrics = reduce_mean(metrics, self.dist)
        metrics.update({"iteration": iteration, "optimizer_step": self.optimizer_steps})
        self.writer.write(metrics)
        if self.dist.is_main:
            self.logger.log(metrics, step=max(iteration, 0))  # loggers' steps start at 0
        return metrics

    def _evaluate(self) -> dict[str, float]:
        """The evaluator on the EMA weights if any (what one would ship), else the raw weights."""
        self.policy.module.eval()
        with torch.random.fork_rng(), (self.ema.swapped_in() if self.ema else contextlib.nullcontext()):
            return {k if k.startswith("eval/") else f"eval/{k}": float(v) for k, v in self.evaluator(self.policy).items()}

    # -- checkpoints --------------------------------------------------------------------------

    def _state(self, next_iteration: int) -> dict[str, Any]:
        return {
            "iteration": next_iteration,
            "optimizer_steps": self.optimizer_steps,
            "model": policy_state_dict(self.policy),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": capture_rng(),
            "logger": {"run_id": getattr(self.logger, "run_id", None)},
            "counters": dict(self.counters),
            **({"ema": self.ema.state_dict()} if self.ema is not None else {}),
            **({"dataloader": self.prompts.state_dict()} if hasattr(self.prompts, "state_dict") else {}),
        }

    def _restore(self) -> int:
        """Load the resume checkpoint if any; returns the first iteration to run."""
        path = self.checkpoints.resolve_resume(self.resume)
        if path is None:
            self.writer.reset()  # starts at iteration 0: lines of an earlier attempt must not stay
            return 0
        state = load_checkpoint(path, map_location=self.dist.device)
        load_policy_state_dict(self.policy, state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step.count = int(state["optimizer_steps"])
        if self.ema is not None:
            if "ema" not in state:
                raise KeyError(f"{path} has no EMA weights but trainer.ema_decay > 0")
            self.ema.load_state_dict(state["ema"])
        if "dataloader" in state and hasattr(self.prompts, "load_state_dict"):
            self.prompts.load_state_dict(state["dataloader"])
        restore_rng(state["rng"])
        self.counters = dict(state.get("counters", {}))
        self.checkpoints.best_value = state.get("best_value")
        run_id = state.get("logger", {}).get("run_id")
        if run_id is not None:
            self.logger.run_id = run_id
        start = int(state["iteration"])
        self.writer.truncate_from(start)
        self.display.write(f"resumed from {path} at iteration {start}")
        return start
