"""bfloat16 edge compute against float32 on one rollout: policy-gradient cosine and log-prob drift.

    python bench/precision.py                      # shipped model=edm/base, default layout
    python bench/precision.py model.skip_prefix=0  # every step trained

For one rollout sampled in float32 and random advantages, the gradient of sum(A * logp) over the
trained steps is computed with the float32 training forward and with the bfloat16 one for several
``model.full_precision_steps`` (k). A cosine below ~0.999 means bf16 rounding changes the update.
The drift is the mean |logp(bf16 training forward) - logp(float32 sampler)| per trained step.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import run as run_module  # noqa: E402


def policy_gradient(policy, rollout, adv: torch.Tensor, cols: torch.Tensor, chunk: int) -> tuple[torch.Tensor, float]:
    """Flattened gradient of ``sum(adv * logp)`` and the mean |logp - recorded| over ``cols``."""
    policy.module.zero_grad()
    drift = []
    for c in cols.split(chunk):
        logp = policy.log_prob(rollout, c, with_reference=False).logp
        (adv[:, None] * logp).sum().backward()
        drift.append((logp.detach() - rollout.logp_old[:, c]).abs().mean().item())
    grad = torch.cat([p.grad.flatten() for p in policy.module.parameters()])
    return grad, sum(drift) / len(drift)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ks", default="0,1,2,3", help="full_precision_steps values to compare")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("overrides", nargs="*", help="Hydra overrides of the model, e.g. model.skip_prefix=0")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["model.dynamics.compute_dtype=float32", *a.overrides])
    torch.manual_seed(a.seed)
    policy = run_module.build(cfg, "model")
    rollout = policy.rollout(torch.tensor([19, 14]), 8)
    adv = torch.randn(rollout.batch_size)
    cols = torch.nonzero(rollout.step_mask.any(dim=0)).squeeze(1)
    chunk = cfg.trainer.step_chunk_size or cols.numel()
    reference, drift32 = policy_gradient(policy, rollout, adv, cols, chunk)
    print(f"model: {cfg.model.dynamics.num_layers} x {cfg.model.dynamics.hidden_nf}, T = {policy.num_steps}, "
          f"{cols.numel()} trained steps; float32 drift {drift32:.2e} nats/step")
    policy.module.compute_dtype = torch.bfloat16  # the same weights, bf16 edge compute
    for k in (int(x) for x in a.ks.split(",")):
        policy.full_precision_steps = k
        grad, drift = policy_gradient(policy, rollout, adv, cols, chunk)
        cos = torch.nn.functional.cosine_similarity(reference.double(), grad.double(), dim=0).item()
        print(f"bfloat16, full_precision_steps = {k}: gradient cosine {cos:.4f}, drift {drift:.2e} nats/step")


if __name__ == "__main__":
    main()
