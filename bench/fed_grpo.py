"""Seconds per FED-GRPO iteration (rollout / reward / update) and sampling molecules/s.

    python bench/fed_grpo.py                                   # the 2-minute job's config (experiment=edm/fed_grpo)
    python bench/fed_grpo.py --experiment edm/elign            # the default job's (64 molecules, KL)
    python bench/fed_grpo.py --layers 9 --hidden 256 --prompts 4 --group-size 24 --steps 1000 \
        --skip-prefix 600 --iterations 1                       # paper layout
    python bench/fed_grpo.py --layers 9 --hidden 256 --prompts 1 --group-size 24 --steps 50 \
        --atoms 19 --sample-only                               # the upstream sampling reference
    python bench/fed_grpo.py ... model.dynamics.compute_dtype=bfloat16   # bf16 edge compute

Random weights (speed does not depend on them). The whole run goes through the real Trainer and
the configs in conf/, so the figures are those of `python run.py` with the same overrides.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import run as run_module  # noqa: E402
from elign.engine.distributed import DistInfo  # noqa: E402
from elign.engine.memory import configure_host_allocator  # noqa: E402
from elign.engine.metrics import read_metrics  # noqa: E402


class FixedAtoms:
    """Every prompt has the same node count (for comparisons at a fixed molecule size)."""

    def __init__(self, inner, atoms: int) -> None:
        self.inner, self.atoms = inner, atoms
        self.group_size, self.batch_size = inner.group_size, inner.batch_size

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        return torch.full_like(next(self.inner), self.atoms)


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=None, help="EGNN blocks (default: config)")
    p.add_argument("--hidden", type=int, default=None, help="EGNN hidden size (default: config)")
    p.add_argument("--prompts", type=int, default=None, help="prompts (node counts) per iteration")
    p.add_argument("--group-size", type=int, default=None, help="samples per prompt")
    p.add_argument("--steps", type=int, default=None, help="T, reverse diffusion steps")
    p.add_argument("--skip-prefix", type=int, default=None, help="shared, untrained first steps")
    p.add_argument("--atoms", type=int, default=None, help="fix every molecule to this many atoms")
    p.add_argument("--iterations", type=int, default=2, help="timed iterations")
    p.add_argument("--warmup", type=int, default=1, help="untimed iterations first (0 for very long layouts)")
    p.add_argument("--micro-batch", type=int, default=None, help="trainer.micro_batch_size")
    p.add_argument("--step-chunk", type=int, default=None, help="trainer.step_chunk_size")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--sample-only", action="store_true", help="time sampling only")
    p.add_argument("--progress", action="store_true", help="show the trainer's progress bar")
    p.add_argument("--experiment", default="edm/fed_grpo", help="recipe the overrides apply to (the figures in "
                   "docs/benchmarks.md are of edm/fed_grpo)")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides, e.g. strategy.kl_coef=0")
    return p.parse_args()


def overrides(a: argparse.Namespace) -> list[str]:
    # Random weights: speed does not depend on them, and a size override could not load the shipped ones.
    out = [f"experiment={a.experiment}", "trainer.progress=false", "trainer.save_interval=1000000",
           "trainer.best_metric=null", "model.checkpoint=null"]
    pairs = {"model.dynamics.num_layers": a.layers, "model.dynamics.hidden_nf": a.hidden,
             "model.num_steps": a.steps, "model.skip_prefix": a.skip_prefix, "dataloader.group_size": a.group_size,
             "trainer.micro_batch_size": a.micro_batch, "trainer.step_chunk_size": a.step_chunk}
    out += [f"{k}={v}" for k, v in pairs.items() if v is not None]
    return out + list(a.overrides)


def main() -> None:
    a = parse()
    torch.set_num_threads(a.threads)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=overrides(a))
        if a.prompts is not None:  # batch = prompts x group size
            extra = [f"dataloader.batch_size={a.prompts * cfg.dataloader.group_size}"]
            cfg = compose("config", overrides=overrides(a) + extra)
    configure_host_allocator(cfg.host_allocator)  # as run.py does
    dist = DistInfo(0, 1, 0, torch.device("cpu"))
    torch.manual_seed(0)
    prompts = run_module.build(cfg, "dataloader")
    if a.atoms is not None:
        prompts = FixedAtoms(prompts, a.atoms)
    policy = run_module.build(cfg, "model")
    params = sum(p.numel() for p in policy.module.parameters())
    layout = f"{prompts.batch_size // prompts.group_size} prompts x {prompts.group_size} samples"
    print(f"model: {cfg.model.dynamics.num_layers} layers x {cfg.model.dynamics.hidden_nf} hidden "
          f"({params / 1e6:.2f} M params); {layout}; T = {cfg.model.num_steps}; "
          f"skip_prefix = {cfg.model.skip_prefix}; threads = {torch.get_num_threads()}")

    if a.sample_only:
        for _ in range(a.warmup):
            policy.rollout(next(prompts), prompts.group_size)
        times = []
        for _ in range(a.iterations):
            start = time.perf_counter()
            r = policy.rollout(next(prompts), prompts.group_size)
            times.append(time.perf_counter() - start)
        mean = sum(times) / len(times)
        atoms = r.payload["node_mask"].sum(1).float().mean().item()
        print(f"sampling: {r.batch_size} molecules (mean {atoms:.1f} atoms) in {mean:.2f} s "
              f"-> {r.batch_size / mean:.2f} molecules/s")
        print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
        return
    if a.progress:
        cfg.trainer.progress = True

    with tempfile.TemporaryDirectory() as tmp:
        trainer = run_module.build(cfg, "trainer", policy=policy, strategy=run_module.build(cfg, "strategy"),
                                   dataloader=prompts, run_dir=tmp, dist=dist,
                                   reward=run_module.build(cfg, "reward"), filter=run_module.build(cfg, "filter"))
        trainer.max_iterations = a.iterations + a.warmup
        trainer.fit()
        rows = read_metrics(tmp)[a.warmup:]
    phases = ("rollout", "reward", "update")
    mean = {p: sum(r[f"timing/{p}"] for r in rows) / len(rows) for p in phases}
    total = sum(mean.values())
    b = prompts.batch_size
    print(f"seconds per iteration: {total:.2f}  (" + ", ".join(f"{p} {mean[p]:.2f}" for p in phases) + ")")
    if trainer.fused:  # the rollout phase also backpropagates: not a sampling figure
        print("trainer.fused_rollout: the rollout takes the per-sample gradients; the update only combines them")
        print(f"iteration throughput: {b / total:.2f} molecules/s (sampling alone: --sample-only)")
    else:
        print(f"sampling throughput: {b / mean['rollout']:.2f} molecules/s; "
              f"iteration throughput: {b / total:.2f} molecules/s")
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB "
          f"(timed over {len(rows)} iterations after {a.warmup} warm-up)")


if __name__ == "__main__":
    main()
