"""Analytic EDM rewards that need no chemistry library."""

from __future__ import annotations

import torch

from elign.engine.rollout import Rollout, RewardOutput


class CompactnessReward:
    """``compactness = -(radius of gyration)`` in Å of the valid atoms of ``payload['positions']``.

    Unweighted by mass. A deterministic, cheap signal whose optimum (collapse) the policy can reach,
    used to show end to end that RL moves samples the right way. A sample with non-finite positions
    gets NaN (the engine applies its penalty) and is counted under ``nonfinite_positions``.
    """

    def __call__(self, rollout: Rollout) -> RewardOutput:
        valid = rollout.payload["node_mask"].bool().unsqueeze(-1)  # [B, N, 1]
        # where, not a product: whatever sits on padding (even NaN) must not leak in.
        pos = torch.where(valid, rollout.payload["positions"].detach().to(torch.float64), 0.0)  # [B, N, 3]
        count = valid.sum(dim=(1, 2)).clamp(min=1).to(torch.float64)  # [B]
        centre = pos.sum(dim=1, keepdim=True) / count.view(-1, 1, 1)
        sq = torch.where(valid, pos - centre, 0.0).pow(2).sum(dim=(1, 2))  # [B]
        rg = torch.sqrt(sq / count)
        bad = ~torch.isfinite(rg)
        value = torch.where(bad, torch.full_like(rg, float("nan")), -rg).float()
        failures = {"nonfinite_positions": int(bad.sum())} if bool(bad.any()) else {}
        good = rg[~bad]
        metrics = {"radius_of_gyration": float(good.mean()) if good.numel() else float("nan")}
        return RewardOutput(channels={"compactness": value}, failures=failures, metrics=metrics)
