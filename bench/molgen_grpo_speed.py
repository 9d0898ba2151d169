"""GRPO step speed, ours vs TRL's ``GRPOTrainer``, on the same tiny Qwen3, tokenizer, reward and sizes.

    python bench/molgen_grpo_speed.py                                   # hidden 64 x 2 layers, 128 tokens
    python bench/molgen_grpo_speed.py --hidden 256 --layers 4 --completion-len 512 --steps 4
    python bench/molgen_grpo_speed.py --side ours                       # one side only

Both sides: a random-init Qwen3 of the given size (one copy of the same weights), the shipped
enriched-SMILES tokenizer, ``--batch`` completions per optimizer step in groups of ``--group``, one
optimizer step per generation batch, TRL's defaults for the loss (dapo, beta 0, epsilon 0.2), and a
reward that returns a seeded random number per completion (so the reward costs nothing on either
side and the bench measures the loop). Every completion is generated to ``--completion-len`` tokens:
the model's LM head gets a bias of -1e4 on the stop tokens, so neither side can stop early and both
count the same tokens.

Each side runs in its own process (``--threads`` torch threads) so its peak RSS is its own; the
first ``--warmup`` steps are not timed; ``--repeats`` alternates the sides and shows each side's median
run (a machine whose load changes then slows both alike). Printed per side: seconds per step split into generate /
reward / update (TRL: the step total, and its own generation time where it logs one), completion
tokens/s and peak RSS; then the speed-up. ``--out`` writes the JSON.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPT_SMILES = ["CCO", "CCN", "CCC", "COC", "CC#N", "CC=O", "OCC", "NCC"]


def build(args: argparse.Namespace) -> tuple[Any, Any, list[int]]:
    """Tokenizer, model (stop tokens biased away) and the stop ids."""
    import torch

    from molgen_grpo.model import build_model
    from molgen_grpo.tokenizer import ASSET_PATH, load_tokenizer, stop_token_ids

    tokenizer = load_tokenizer(ASSET_PATH)
    torch.manual_seed(0)
    heads = max(args.hidden // 32, 1)
    model = build_model(len(tokenizer), init="random", hidden_size=args.hidden, num_hidden_layers=args.layers,
                        num_attention_heads=heads, num_key_value_heads=max(heads // 2, 1),
                        intermediate_size=2 * args.hidden, head_dim=args.hidden // heads,
                        max_position_embeddings=args.completion_len + 64)
    stops = stop_token_ids(tokenizer, ["[/CONFORMER]", "<|endoftext|>"])
    head = model.lm_head
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        biased.bias.zero_()
        biased.bias[stops] = -1.0e4
    model.lm_head = biased
    model.config.tie_word_embeddings = False
    return tokenizer, model, stops


def prompts(args: argparse.Namespace) -> list[str]:
    count = args.batch // args.group
    return [f"[SMILES]{PROMPT_SMILES[i % len(PROMPT_SMILES)]}[/SMILES]" for i in range(count)]


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_ours(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    import torch

    from elign.engine.distributed import DistInfo
    from elign.engine.rollout import RewardOutput
    from elign.engine.schedule import ConstantSchedule
    from elign.engine.strategies.grpo import GRPOStrategy
    from elign.engine.trainer import Trainer
    from molgen_grpo.policy import Prompt, Qwen3Policy

    tokenizer, model, _ = build(args)
    policy = Qwen3Policy(tokenizer, model, stop_tokens=["[/CONFORMER]", "<|endoftext|>"],
                         max_new_tokens=args.completion_len, temperature=1.0)
    texts = prompts(args)

    class Source:
        batch_size, group_size = args.batch, args.group

        def __iter__(self):
            return self

        def __next__(self):
            return [Prompt(i, t) for i, t in enumerate(texts)]

    rng = np.random.default_rng(0)

    def reward(rollout):
        return RewardOutput(channels={"random": torch.as_tensor(rng.random(rollout.batch_size), dtype=torch.float64)})

    run_dir = Path(args.work_dir) / "ours"
    trainer = Trainer(policy=policy, strategy=GRPOStrategy(), reward=reward, dataloader=Source(), run_dir=run_dir,
                      dist=DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")),
                      optimizer=lambda groups: torch.optim.AdamW(groups, lr=1e-6), lr_schedule=ConstantSchedule(0),
                      max_iterations=args.warmup + args.steps, micro_batch_size=args.batch, step_chunk_size=None,
                      grad_accum_steps=None, inner_epochs=1, max_grad_norm=1.0, save_interval=10**9,
                      best_metric=None, best_mode="max", resume=None, seed=0, progress=False)
    trainer.fit()
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()][args.warmup:]
    phases = {p: float(np.mean([r[f"timing/{p}"] for r in rows])) for p in ("rollout", "reward", "update")}
    step = sum(phases.values())
    tokens = float(np.mean([r["completions/mean_length"] for r in rows])) * args.batch
    return {"side": "ours", "s_per_step": step, "generate_s": phases["rollout"], "reward_s": phases["reward"],
            "update_s": phases["update"], "completion_tokens_per_step": tokens, "tokens_per_s": tokens / step,
            "peak_rss_mib": peak_rss_mib()}


def run_trl(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    tokenizer, model, _ = build(args)
    rng = np.random.default_rng(0)
    lengths: list[float] = []

    def reward(prompts, completions, completion_ids=None, **kwargs):
        lengths.extend(len(c) for c in completion_ids)
        return rng.random(len(prompts)).tolist()

    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            if not stamps:
                stamps.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            stamps.append(time.perf_counter())

    steps = args.warmup + args.steps
    config = GRPOConfig(output_dir=str(Path(args.work_dir) / "trl"), use_cpu=True, per_device_train_batch_size=args.batch,
                        num_generations=args.group, max_completion_length=args.completion_len, max_steps=steps,
                        learning_rate=1e-6, report_to="none", save_strategy="no", logging_steps=1, bf16=False,
                        temperature=1.0, dataloader_num_workers=0, disable_tqdm=True)
    data = Dataset.from_dict({"prompt": prompts(args) * (steps * 2)})
    trainer = GRPOTrainer(model=model, processing_class=tokenizer, reward_funcs=reward, args=config,
                          train_dataset=data, callbacks=[Clock()])
    trainer.train()
    times = np.diff(stamps)[args.warmup:]
    step = float(np.mean(times))
    per_step = len(lengths) // steps
    tokens = float(np.mean(lengths[args.warmup * per_step:])) * args.batch
    return {"side": "trl", "s_per_step": step, "generate_s": None, "reward_s": None, "update_s": None,
            "completion_tokens_per_step": tokens, "tokens_per_s": tokens / step, "peak_rss_mib": peak_rss_mib()}


def child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    result = run_ours(args) if args.side == "ours" else run_trl(args)
    result.update(hidden=args.hidden, layers=args.layers, completion_len=args.completion_len, batch=args.batch,
                  group=args.group, threads=args.threads, steps=args.steps)
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=64, help="Qwen3 hidden size")
    parser.add_argument("--layers", type=int, default=2, help="Qwen3 layers")
    parser.add_argument("--completion-len", type=int, default=128, help="tokens per completion (all generated)")
    parser.add_argument("--batch", type=int, default=8, help="completions per optimizer step")
    parser.add_argument("--group", type=int, default=4, help="completions per prompt (G)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per side")
    parser.add_argument("--warmup", type=int, default=1, help="untimed first steps")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per side")
    parser.add_argument("--side", choices=("both", "ours", "trl"), default="both")
    parser.add_argument("--repeats", type=int, default=1, help="runs per side, alternating; the median run is shown")
    parser.add_argument("--work-dir", default="outputs/bench/molgen_grpo_speed", help="run directories")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.batch % args.group:
        parser.error(f"--batch {args.batch} must be a multiple of --group {args.group}")
    if args.child:
        child(args)
        return
    sides = ("ours", "trl") if args.side == "both" else (args.side,)
    runs: dict[str, list[dict[str, Any]]] = {side: [] for side in sides}
    for _ in range(args.repeats):  # sides alternate, so a load change on the machine hits both
        for side in sides:
            cmd = [sys.executable, __file__, "--child", "--side", side] + [
                f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                if k in ("hidden", "layers", "completion_len", "batch", "group", "steps", "warmup", "threads", "work_dir")]
            out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
            if out.returncode != 0 or line is None:
                sys.exit(f"{side} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
            runs[side].append(json.loads(line[len("RESULT "):]))
    # the run with the median tokens/s of each side
    results = [sorted(r, key=lambda x: x["tokens_per_s"])[len(r) // 2] for r in runs.values()]
    print(f"Qwen3 hidden {args.hidden} x {args.layers} layers, {args.batch} completions of {args.completion_len} "
          f"tokens per step, G = {args.group}, {args.threads} threads, {args.steps} timed steps, "
          f"median of {args.repeats} alternating run(s) per side")
    print(f"{'side':<6} {'s/step':>8} {'generate':>9} {'reward':>8} {'update':>8} {'tokens/s':>10} {'peak RSS MiB':>13}")
    for r in results:
        fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        print(f"{r['side']:<6} {r['s_per_step']:>8.3f} {fmt(r['generate_s']):>9} {fmt(r['reward_s']):>8} "
              f"{fmt(r['update_s']):>8} {r['tokens_per_s']:>10.0f} {r['peak_rss_mib']:>13.0f}")
    if len(results) == 2:
        print(f"speed-up (completion tokens/s, ours / TRL): {results[0]['tokens_per_s'] / results[1]['tokens_per_s']:.2f}x")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"median": results, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
