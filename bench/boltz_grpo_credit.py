"""Which sampler actions and which rewards give Boltz-2 GRPO a learnable signal (issue 17 diagnostics).

    python bench/boltz_grpo_credit.py --base-run outputs/boltz_sft/seed_1           # both parts, the SFT model
    python bench/boltz_grpo_credit.py --part snr --rollouts 24 -- model.sampling_steps=50
    python bench/boltz_grpo_credit.py --out outputs/credit.json -- model=boltz/pretrained model.backend.trusted=true

The policy, prompts and reward are the GRPO recipe's (``experiment=boltz/grpo`` plus the overrides after ``--``),
``--base-run`` merging an SFT run's adapters first, as ``model.base_run`` does (with that run's ``seed``, which
built its base model).

Part 1 (branch): for each of ``--targets`` prompts, G samples that share one trajectory up to sampler step k and
branch there (``sample_trajectory(shared_steps=k)``); the within-group standard deviation of each reward channel
against k. Where it is still the full spread (k = 0), the noise of the steps before k is forgotten by the end of
the trajectory: their actions cannot move the reward, so their log-prob gradients are pure variance (set
``model.max_action_noise_angstrom`` below t̂_k). Branching after the last stochastic step leaves only the
random augmentation's spread (the denoiser is not rotation-equivariant).

Part 2 (snr): K independent rollouts of the recipe's policy (``--rollouts``); per reward channel, the GRPO
policy gradient of each rollout ``g_k = ∇ −mean_i A_i Σ_t log p_{i,t}`` (group-normalised advantage, the recipe's
trained actions, no KL, no clipping: the first update of a run). Signal ``|E g|²`` (unbiased: ``|ḡ|² − tr Σ / K``)
against the per-rollout noise ``tr Σ``; their ratio is the signal-to-noise of one rollout's gradient, and 1 / SNR
the rollouts an update needs to point the right way. A control channel shuffles lDDT across the batch (no signal
by construction): its SNR is the estimate's zero. Split-half cosine: of the two halves' mean gradients.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHANNELS = ("lddt_ca", "neg_rmsd", "tm_score", "clash", "chain_break")
CONTROL = "shuffled_lddt_ca"


def build(overrides: list[str], base_run: str | None) -> tuple[Any, Any, Any]:
    """The recipe's policy, prompt source and reward (all channels of :data:`CHANNELS`)."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from omegaconf import OmegaConf

    # The adapters only fit the base they were trained on: build it from the base run's seed.
    extra = [f"seed={OmegaConf.load(Path(base_run) / 'config.yaml').seed}",
             f"model.base_run={Path(base_run).resolve()}"] if base_run else []
    with initialize_config_dir(str(ROOT / "conf"), version_base=None):
        cfg = compose("config", overrides=["experiment=boltz/grpo", f"reward.channels=[{','.join(CHANNELS)}]",
                                           *extra, *overrides])
    torch.manual_seed(int(cfg.seed))
    return instantiate(cfg.model), instantiate(cfg.dataloader), instantiate(cfg.reward)


def branch_table(policy: Any, prompts: Any, reward: Any, targets: int, group_size: int) -> dict[str, Any]:
    """Within-group std of each channel when the G samples branch at step k (mean over targets)."""
    batch: list[Any] = []
    while len(batch) < targets:
        batch += next(prompts)
    batch = batch[:targets]
    stochastic = int((policy.schedule.var > 0).sum())
    rows, saved = [], policy.shared_steps
    try:
        for k in range(stochastic + 1):
            policy.shared_steps = k
            torch.manual_seed(100 + k)
            rollout = policy.rollout(batch, group_size)
            out = reward(rollout)
            stds = {c: float(torch.stack([out.channels[c][rollout.group_ids == g].std()
                                          for g in rollout.group_ids.unique()]).nanmean()) for c in CHANNELS}
            level = float(policy.schedule.t_hat[k]) if k < policy.schedule.num_steps else 0.0
            rows.append({"branch_step": k, "t_hat_angstrom": level, "std": stds})
            print(f"branch at step {k:2d} (t̂ {level:8.2f} Å): "
                  + "  ".join(f"{c} {v:.4f}" for c, v in stds.items()), flush=True)
    finally:
        policy.shared_steps = saved
    return {"targets": [p["meta"]["pdb_id"] for p in batch], "group_size": group_size, "rows": rows}


def gradient_snr(policy: Any, prompts: Any, reward: Any, rollouts: int, group_size: int) -> dict[str, Any]:
    """Signal, noise and split-half cosine of the per-rollout GRPO gradient for each channel and the control."""
    from elign.engine.advantages import group_normalize

    params = [p for _, p in policy.trainable_parameters()]
    grads: dict[str, list[torch.Tensor]] = {c: [] for c in (*CHANNELS, CONTROL)}
    for k in range(rollouts):
        torch.manual_seed(1000 + k)
        rollout = policy.rollout(next(prompts), group_size)
        out = reward(rollout)
        steps = rollout.step_mask.any(0).nonzero().flatten()
        logp = policy.log_prob(rollout, steps, with_reference=False).logp  # [B, t]
        mask = rollout.step_mask[:, steps].to(logp)
        for name in grads:
            values = out.channels["lddt_ca" if name == CONTROL else name].float()
            if name == CONTROL:
                values = values[torch.randperm(values.numel())]
            values = torch.nan_to_num(values, nan=float(values.nanmean()))
            adv = group_normalize(values, rollout.group_ids).to(logp)
            loss = -(adv.unsqueeze(1) * logp * mask).sum() / logp.shape[0]
            g = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
            grads[name].append(torch.cat([(x if x is not None else torch.zeros_like(p)).flatten()
                                          for x, p in zip(g, params)]))
        print(f"rollout {k + 1}/{rollouts}: lddt_ca {float(out.channels['lddt_ca'].nanmean()):.4f}", flush=True)
    return {name: snr_stats(torch.stack(gs)) for name, gs in grads.items()}


def snr_stats(grads: torch.Tensor) -> dict[str, float]:
    """Signal and noise of K gradient draws ``[K, P]``: ``noise`` = tr Σ (unbiased), ``signal`` = |E g|²
    (unbiased: |ḡ|² − tr Σ / K), their ratio, and the cosine of the two halves' means."""
    g = grads.double()
    k = g.shape[0]
    mean = g.mean(0)
    noise = float(((g - mean) ** 2).sum() / (k - 1))
    signal = float(mean.pow(2).sum()) - noise / k
    cosine = float(torch.nn.functional.cosine_similarity(g[: k // 2].mean(0), g[k // 2:].mean(0), dim=0))
    return {"signal": signal, "noise": noise, "snr_per_rollout": signal / noise if noise > 0 else float("nan"),
            "split_half_cosine": cosine}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-run", default=None, help="an SFT run directory whose adapters are merged first")
    parser.add_argument("--part", choices=("branch", "snr", "both"), default="both", help="which part to run")
    parser.add_argument("--targets", type=int, default=3, help="branch: prompts (crops) to branch")
    parser.add_argument("--rollouts", type=int, default=12, help="snr: independent rollouts K (>= 4)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is stable on a shared machine)")
    parser.add_argument("--out", type=Path, default=None, help="write every figure as JSON here")
    parser.add_argument("overrides", nargs="*", help="run.py overrides of the GRPO recipe")
    args = parser.parse_args()
    if args.rollouts < 4:
        parser.error("--rollouts must be at least 4 (two halves of two)")
    torch.set_num_threads(args.threads)
    policy, prompts, reward = build(args.overrides, args.base_run)
    group_size = int(prompts.group_size)
    report: dict[str, Any] = {"overrides": args.overrides, "base_run": args.base_run,
                              "trained_actions_t_hat": [round(float(t), 3) for t in
                                                        policy.schedule.t_hat[1:][policy.trained_actions]]}
    if args.part in ("branch", "both"):
        report["branch"] = branch_table(policy, prompts, reward, args.targets, group_size)
    if args.part in ("snr", "both"):
        report["snr"] = gradient_snr(policy, prompts, reward, args.rollouts, group_size)
        print(f"\nGRPO gradient per rollout ({args.rollouts} rollouts of {prompts.batch_size} samples, trained actions "
              f"at t̂ = {report['trained_actions_t_hat']} Å)\n")
        print("| reward | signal |E g|² | noise tr Σ | SNR per rollout | rollouts for SNR 1 | split-half cosine |")
        print("|---|---:|---:|---:|---:|---:|")
        for name, r in report["snr"].items():
            need = f"{1 / r['snr_per_rollout']:.0f}" if r["snr_per_rollout"] > 0 else "∞ (no signal)"
            print(f"| {name} | {r['signal']:.3g} | {r['noise']:.3g} | {r['snr_per_rollout']:.3f} | {need} | "
                  f"{r['split_half_cosine']:.2f} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
