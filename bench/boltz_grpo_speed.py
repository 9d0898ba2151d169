"""Boltz-2 GRPO speed (issue 17): the recipe's seconds per iteration, and our sampler against boltz's own.

    python bench/boltz_grpo_speed.py                                  # both parts, 2 threads
    python bench/boltz_grpo_speed.py --threads 1                      # the docs' figures (7 min on 2 busy cores)
    python bench/boltz_grpo_speed.py --quick                          # fewer iterations, sizes and repeats
    python bench/boltz_grpo_speed.py --part job --iterations 10       # part 1 only
    python bench/boltz_grpo_speed.py --part sampler --sizes 32 64 whole --samples 4 16 --steps 20 200
    python bench/boltz_grpo_speed.py --part job dataloader.max_tokens=64   # extra overrides of the job

Part 1 (job): ``python run.py experiment=boltz/grpo trainer.max_iterations=<warm-up + N> trainer.eval_interval=0``
in a subprocess (``--threads`` OpenMP threads; one checkpoint at the end, no acceptance report); the timed
iterations are read back from its ``metrics.jsonl`` (``timing/rollout_trunk``, ``timing/rollout_sampling``,
``timing/reward``, ``timing/update``; "rollout other" is the rest of ``timing/rollout``: stacking the payload) after
the warm-up ones.
The logged ``rollout/trunk_passes`` is what the policy claims; the subprocess also wraps ``Boltz2Core.trunk`` and
counts every call between two rollouts, so the update's trunk passes (there should be none: the recipe's adapters
sit on the diffusion module only) are counted too. Target: trunk passes per iteration == targets per iteration
(not samples).

Part 2 (sampler): the recipe's tiny Boltz-2 (random weights, ``conf/model/boltz/tiny.yaml``, built twice from the
same seed: bare, and inside the recipe's ``BoltzSamplerPolicy`` with its LoRA) in eval mode, no_grad, on crambin /
ubiquitin from ``package:boltz_ft/data/pdb`` featurized by ``boltz_ft.data.featurize`` (``--sizes``: token crops,
``whole`` = all of 1ubq). Per size, G (``--samples``) and steps (``--steps``), each call is timed ``--repeats``
times after one untimed warm-up, the methods interleaved (a load change hits all alike), the median shown:

* sampler alone on the same trunk: boltz's ``structure_module.sample`` (``Boltz2Core.sample``) vs our
  ``boltz_ft.sampler.sample_trajectory`` over ``Boltz2Core.denoise``; both from the same seed, so the coordinates
  must be bitwise equal (column "same coords");
* boltz's inference forward ``Boltz2.forward(feats, recycling_steps=0, num_sampling_steps=S, diffusion_samples=G)``
  (trunk + sampler + confidence head) with and without its trunk (``Boltz2Core.trunk`` timed alone) vs our rollout
  path for one target (``Boltz2Core.trunk`` once + ``sample_trajectory``) and the recipe's ``policy.rollout`` itself
  (LoRA parametrisations on every diffusion-module linear, payload stacking).

Target: the median over the rows of ours / boltz (sampler alone, median times) <= 1.05, i.e. parity within the
noise of a shared CPU, and bitwise-equal coordinates in every row; a single row above 1.05 is marked ``*`` (its
ratio of the fastest calls is shown next to it). ``--out`` writes everything, with every call's time, as JSON.

Threads: on a 2-core machine shared with other jobs, 2 OpenMP threads per process can run 20-50x slower than 1
(threads wait at barriers for a core another process holds); the load average is printed with the results, and
``--threads 1`` gives stable figures there.
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

EXPERIMENT = "boltz/grpo"
COUNT_FILE_ENV = "BOLTZ_GRPO_SPEED_COUNTS"  # where the job subprocess writes its trunk-call marks
PARITY = 1.05  # ours / boltz at or below this counts as parity (noise of a shared CPU)
PHASES = (("trunk", "timing/rollout_trunk"), ("sampling", "timing/rollout_sampling"), ("rollout other", None),
          ("reward", "timing/reward"), ("update", "timing/update"))


# ---------------------------------------------------------------------------------------------------- part 1: job

def job_child(overrides: list[str]) -> None:
    """In the job subprocess: count ``Boltz2Core.trunk`` calls, mark each rollout's start, then run ``run.py``."""
    from boltz_ft.core import Boltz2Core
    from boltz_ft.grpo import BoltzSamplerPolicy

    calls, marks = [0], []  # marks[i]: trunk calls before iteration i's rollout
    trunk, rollout = Boltz2Core.trunk, BoltzSamplerPolicy.rollout

    def counted_trunk(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return trunk(self, *args, **kwargs)

    def marked_rollout(self: Any, *args: Any, **kwargs: Any) -> Any:
        marks.append(calls[0])
        return rollout(self, *args, **kwargs)

    Boltz2Core.trunk, BoltzSamplerPolicy.rollout = counted_trunk, marked_rollout
    sys.argv = [str(ROOT / "run.py"), *overrides]
    try:
        runpy.run_path(str(ROOT / "run.py"), run_name="__main__")
    finally:
        Path(os.environ[COUNT_FILE_ENV]).write_text(json.dumps(marks + [calls[0]]))


def run_job(args: argparse.Namespace) -> dict[str, Any]:
    """The recipe as a subprocess; per-phase mean and std over the timed iterations."""
    run_dir = Path(args.work_dir).resolve() / "job"
    counts = Path(args.work_dir).resolve() / "trunk_calls.json"
    counts.parent.mkdir(parents=True, exist_ok=True)
    overrides = [f"experiment={EXPERIMENT}", f"trainer.max_iterations={args.warmup + args.iterations}",
                 "trainer.eval_interval=0", "trainer.save_interval=1000000", "trainer.best_metric=null",
                 "trainer.progress=false", "acceptance.enabled=false", f"hydra.run.dir={run_dir}", "overwrite=true",
                 *args.overrides]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           COUNT_FILE_ENV: str(counts)}
    start = time.perf_counter()
    out = subprocess.run([sys.executable, __file__, "--job-child", *overrides], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    wall = time.perf_counter() - start
    if out.returncode != 0:
        sys.exit(f"the job failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    from elign.engine.metrics import read_metrics
    from omegaconf import OmegaConf

    rows = [r for r in read_metrics(run_dir) if r["iteration"] >= 0]
    marks = json.loads(counts.read_text())
    counted = [b - a for a, b in zip(marks, marks[1:])]
    cfg = OmegaConf.load(run_dir / "config.yaml")
    targets = int(cfg.dataloader.batch_size) // int(cfg.dataloader.group_size)
    timed = rows[args.warmup:]
    per_phase: dict[str, list[float]] = {}
    for name, key in PHASES:
        if key is None:  # the rollout's own bookkeeping (payload stacking) outside trunk and sampling
            per_phase[name] = [r["timing/rollout"] - r["timing/rollout_trunk"] - r["timing/rollout_sampling"]
                               for r in timed]
        else:
            per_phase[name] = [r[key] for r in timed]
    per_phase["total"] = [r["timing/rollout"] + r["timing/reward"] + r["timing/update"] for r in timed]
    return {"overrides": overrides, "wall_s": wall, "targets": targets, "group_size": int(cfg.dataloader.group_size),
            "max_tokens": cfg.dataloader.max_tokens, "sampling_steps": int(cfg.model.sampling_steps),
            "iterations": len(timed), "warmup": args.warmup, "threads": args.threads,
            "seconds": {k: (statistics.mean(v), statistics.stdev(v) if len(v) > 1 else 0.0)
                        for k, v in per_phase.items()},
            "trunk_passes_logged": [r["rollout/trunk_passes"] for r in rows], "trunk_passes_counted": counted}


def print_job(r: dict[str, Any]) -> bool:
    samples = r["targets"] * r["group_size"]
    print(f"## Part 1: python run.py experiment={EXPERIMENT} ({r['targets']} targets x G = {r['group_size']} = "
          f"{samples} samples, {r['max_tokens']} tokens, {r['sampling_steps']} sampler steps, {r['threads']} threads;"
          f" {r['iterations']} timed iterations after {r['warmup']} warm-up; job wall {r['wall_s']:.0f} s)\n")
    print("| phase | s / iteration (mean ± std) | share |")
    print("|---|---:|---:|")
    total = r["seconds"]["total"][0]
    for name, (mean, std) in r["seconds"].items():
        share = "" if name == "total" else f"{100 * mean / total:.0f} %"
        label = f"**{name}**" if name == "total" else name
        print(f"| {label} | {mean:.3f} ± {std:.3f} | {share} |")
    print(f"\nsamples/s over the whole iteration: {samples / total:.2f}")
    logged, counted = r["trunk_passes_logged"], r["trunk_passes_counted"]
    ok = len(counted) == len(logged) and all(c == r["targets"] for c in counted) \
        and all(v == r["targets"] for v in logged)
    print(f"trunk passes per iteration: logged {sorted(set(logged))}, counted (every Boltz2Core.trunk call, "
          f"rollout + update) {sorted(set(counted))}; targets per iteration {r['targets']}, samples {samples}: "
          f"{'PASS' if ok else 'FAIL'}\n")
    return ok


# ---------------------------------------------------------------------------------------------- part 2: sampler

def compose_recipe(overrides: list[str]) -> Any:
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=[f"experiment={EXPERIMENT}", *overrides])


def load_targets(sizes: list[str], seed: int) -> list[tuple[str, dict[str, Any]]]:
    """``(label, batch)`` per size: crambin for crops of at most its 46 residues, else ubiquitin; ``whole`` = 1ubq."""
    from boltz_ft.ccd import CCDMolecules
    from boltz_ft.data import featurize, load_structure, split_batch

    pdb = ROOT / "boltz_ft" / "data" / "pdb"
    ccd = CCDMolecules()
    structures = {name: load_structure(pdb / f"{name}.pdb", ccd) for name in ("1crn", "1ubq")}
    out = []
    for size in sizes:
        tokens = None if size == "whole" else int(size)
        name = "1crn" if tokens is not None and tokens <= 46 else "1ubq"
        feats = featurize(structures[name], ccd, seed=seed, max_tokens=tokens)
        batch = split_batch(feats, {"pdb_id": name})
        n_tok = int(feats["token_pad_mask"].sum())
        n_atom = int(feats["atom_pad_mask"].sum())
        label = f"{name} {'whole' if tokens is None else f'crop {tokens}'}: {n_tok} tok, {n_atom} atoms " \
                f"(pad {feats['atom_pad_mask'].shape[0]})"
        out.append((label, batch))
    return out


def timed(fn: Callable[[], Any], seed: int) -> tuple[float, Any]:
    import torch

    torch.manual_seed(seed)
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def run_sampler(args: argparse.Namespace) -> list[dict[str, Any]]:
    import torch
    from hydra.utils import instantiate

    from boltz_ft.core import Boltz2Core
    from boltz_ft.policy import merge_features
    from boltz_ft.sampler import sample_trajectory, sampler_schedule

    cfg = compose_recipe([f"seed={args.seed}"])
    model = instantiate(cfg.model.backend).eval()  # the recipe's tiny Boltz2, bare
    core = Boltz2Core(model)
    targets = load_targets(args.sizes, args.seed)
    results = []
    for steps in args.steps:
        policy = instantiate(cfg.model, sampling_steps=steps)  # the recipe's policy: same weights + LoRA
        schedule = sampler_schedule(model.structure_module, steps)
        for label, batch in targets:
            feats = merge_features(batch, "cpu")
            with torch.no_grad():
                trunk = core.trunk(feats, 0, grad=False)
            for g in args.samples:
                def ours_sample(trunk: Any = trunk, feats: dict = feats, g: int = g) -> Any:
                    return sample_trajectory(lambda x, t: core.denoise(trunk, feats, x, t, g), schedule,
                                             feats["atom_pad_mask"][0], g).coords

                def ours_rollout(feats: dict = feats, g: int = g) -> Any:
                    tr = core.trunk(feats, 0, grad=False)
                    return sample_trajectory(lambda x, t: core.denoise(tr, feats, x, t, g), schedule,
                                             feats["atom_pad_mask"][0], g).coords

                methods: dict[str, Callable[[], Any]] = {
                    "boltz_sample": lambda trunk=trunk, feats=feats, g=g: core.sample(trunk, feats, steps, g),
                    "ours_sample": ours_sample,
                    "boltz_forward": lambda feats=feats, g=g: model(dict(feats), recycling_steps=0,
                                                                    num_sampling_steps=steps, diffusion_samples=g),
                    "trunk": lambda feats=feats: core.trunk(feats, 0, grad=False),
                    "ours_trunk_sample": ours_rollout,
                    "policy_rollout": lambda batch=batch, g=g: policy.rollout([batch], g),
                }
                times: dict[str, list[float]] = {k: [] for k in methods}
                coords = {}
                with torch.no_grad():
                    for k, fn in methods.items():  # warm-up (and the coordinates of the bitwise check)
                        coords[k] = timed(fn, args.seed)[1]
                    for rep in range(args.repeats):
                        order = list(methods)
                        order = order[rep % len(order):] + order[:rep % len(order)]  # rotate: no fixed neighbour
                        for k in order:
                            times[k].append(timed(methods[k], args.seed + rep)[0])
                same = torch.equal(coords["boltz_sample"], coords["ours_sample"])
                med = {k: statistics.median(v) for k, v in times.items()}
                results.append({"target": label, "G": g, "steps": steps, "median_s": med, "times_s": times,
                                "bitwise_equal": same, "repeats": args.repeats})
                print(f"  {label}, G {g}, {steps} steps: boltz {med['boltz_sample']:.3f} s, ours "
                      f"{med['ours_sample']:.3f} s", file=sys.stderr, flush=True)
    return results


def print_sampler(results: list[dict[str, Any]], args: argparse.Namespace) -> bool:
    print(f"## Part 2: our sampler vs boltz's (tiny Boltz-2, random weights, eval, no_grad; {args.threads} threads; "
          f"median of {args.repeats} interleaved repeats after 1 warm-up)\n")
    print("Sampler alone, same trunk: boltz `structure_module.sample` vs our `sample_trajectory`.\n")
    print("| target | G | steps | boltz sample s | ours s | ours / boltz | ours / boltz (min times) | same coords |")
    print("|---|---:|---:|---:|---:|---:|---:|:---:|")
    for r in results:
        m, t = r["median_s"], r["times_s"]
        ratio = m["ours_sample"] / m["boltz_sample"]
        flag = "" if ratio <= PARITY else " *"
        print(f"| {r['target']} | {r['G']} | {r['steps']} | {m['boltz_sample']:.3f} | {m['ours_sample']:.3f} | "
              f"{ratio:.2f}{flag} | {min(t['ours_sample']) / min(t['boltz_sample']):.2f} | "
              f"{'yes' if r['bitwise_equal'] else 'NO'} |")
    ratios = [r["median_s"]["ours_sample"] / r["median_s"]["boltz_sample"] for r in results]
    same = all(r["bitwise_equal"] for r in results)
    ok = statistics.median(ratios) <= PARITY and same
    print(f"\nsampler ours / boltz over the rows: median {statistics.median(ratios):.2f}, "
          f"range [{min(ratios):.2f}, {max(ratios):.2f}]; coordinates bitwise equal in "
          f"{'every' if same else 'NOT every'} row.\nTarget: median <= {PARITY} (parity within the noise of a shared "
          f"CPU; a row above it is marked *, compare its min-time ratio): {'PASS' if ok else 'FAIL'}\n")
    print("Full inference: boltz `Boltz2.forward` (trunk + sampler + confidence head; \"- trunk\": "
          "minus `Boltz2Core.trunk` timed alone; \"≈ confidence\": minus boltz's sampler too, a difference of "
          "medians) vs our rollout of one target (trunk once + `sample_trajectory`) and "
          "the recipe's `policy.rollout` (LoRA on the diffusion module).\n")
    print("| target | G | steps | trunk s | boltz forward s | forward - trunk s | ≈ confidence s | "
          "ours trunk + sample s | ours / forward | ours sample / (forward - trunk) | policy.rollout s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        m = r["median_s"]
        rest = m["boltz_forward"] - m["trunk"]
        print(f"| {r['target']} | {r['G']} | {r['steps']} | {m['trunk']:.3f} | {m['boltz_forward']:.3f} | "
              f"{rest:.3f} | {rest - m['boltz_sample']:.3f} | {m['ours_trunk_sample']:.3f} | "
              f"{m['ours_trunk_sample'] / m['boltz_forward']:.2f} | {m['ours_sample'] / rest:.2f} | "
              f"{m['policy_rollout']:.3f} |")
    print()
    return ok


# ---------------------------------------------------------------------------------------------------------- main

def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=("all", "job", "sampler"), default="all", help="what to run")
    p.add_argument("--quick", action="store_true", help="3 timed iterations, sizes 32 64, G 4, 20 steps, 3 repeats")
    p.add_argument("--iterations", type=int, default=None, help="timed job iterations (default 8; quick 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed first job iterations")
    p.add_argument("--sizes", nargs="+", default=None, help="token crops, or 'whole' (default 32 64 whole)")
    p.add_argument("--samples", type=int, nargs="+", default=None, help="G values (default 4 16)")
    p.add_argument("--steps", type=int, nargs="+", default=None, help="sampler steps (default 20)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per method (default 9; quick 3)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (both parts)")
    p.add_argument("--seed", type=int, default=0, help="model, crop and sampling seed of part 2")
    p.add_argument("--work-dir", default="outputs/bench/boltz_grpo_speed", help="the job's run directory")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--job-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides of the job (part 1)")
    a = p.parse_args()
    quick = a.quick
    a.iterations = a.iterations or (3 if quick else 8)
    a.sizes = a.sizes or (["32", "64"] if quick else ["32", "64", "whole"])
    a.samples = a.samples or ([4] if quick else [4, 16])
    a.steps = a.steps or [20]
    a.repeats = a.repeats or (3 if quick else 9)
    return a


def main() -> None:
    if "--job-child" in sys.argv:  # the job subprocess: everything after the flag is run.py's command line
        job_child(sys.argv[sys.argv.index("--job-child") + 1:])
        return
    args = parse()
    import torch

    torch.set_num_threads(args.threads)
    results: dict[str, Any] = {"command": " ".join([Path(sys.executable).name, *sys.argv])}
    verdicts = []
    if args.part in ("all", "sampler"):  # first: the sampler calls are short, the job's numbers land last
        print(f"part 2: sizes {args.sizes}, G {args.samples}, steps {args.steps}", file=sys.stderr, flush=True)
        results["sampler"] = run_sampler(args)
    if args.part in ("all", "job"):
        print(f"part 1: {args.warmup} + {args.iterations} iterations of the job", file=sys.stderr, flush=True)
        results["job"] = run_job(args)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"command: {results['command']}\nload average at the end (1, 5, 15 min): {load} on {os.cpu_count()} CPUs\n")
    if "job" in results:
        verdicts.append(("trunk passes per iteration == targets", print_job(results["job"])))
    if "sampler" in results:
        verdicts.append((f"sampler ours / boltz <= {PARITY} (median over rows), same coordinates",
                         print_sampler(results["sampler"], args)))
    for name, ok in verdicts:
        print(f"{'PASS' if ok else 'FAIL'}: {name}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
