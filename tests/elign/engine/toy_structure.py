"""A structure-prediction-like domain: a frozen trunk embeds each prompt once, a frozen denoiser with
low-rank (LoRA-style) adapters runs a few Gaussian denoising steps, and the reward is the fit to the
prompt's true structure.

What it exercises in the engine: per-group payload (the trunk's context, ``[P, C]``, one row per
group, never repeated ``K`` times), adapter-only training and checkpoints (``trainable_parameters``,
``state_dict`` through the engine's helpers), the reference as the same network with its adapters
switched off, and the closed-form Gaussian KL (the step std is a fixed schedule, so ``log pi`` is
exact). The adapter of the confidence head is not on the log-prob path, so DDP needs
``find_unused_parameters``.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from elign.engine.policy_state import load_trainable_state_dict, trainable_state_dict
from elign.engine.rollout import RewardOutput, Rollout, StepLogProbs


class CountingTrunk(nn.Module):
    """Frozen prompt encoder ``[P, F] -> [P, C]`` that counts its calls and the rows it embeds
    (the expensive part of a structure model, which must run once per prompt)."""

    def __init__(self, features: int, context: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(features, 256), nn.Tanh(), nn.Linear(256, context))
        self.calls = 0
        self.rows = 0

    def forward(self, features: Tensor) -> Tensor:
        self.calls += 1
        self.rows += features.shape[0]
        return self.mlp(features)


class LoRALinear(nn.Module):
    """``base(x) + scale * x A^T B^T`` with a frozen base; B starts at 0, so the adapted layer starts
    as the base, and :attr:`enabled` False gives the base exactly (the KL reference)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float = 1.0) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.lora_a = nn.Parameter(torch.randn(rank, base.in_features) / math.sqrt(base.in_features))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))
        self.scale, self.enabled = alpha / rank, True

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        return y + self.scale * (x @ self.lora_a.T) @ self.lora_b.T if self.enabled else y


class StructureNet(nn.Module):
    """Trunk, denoiser ``D(x, context, step) -> x0`` and confidence head; adapters on the denoiser
    and the head, everything else frozen."""

    def __init__(self, num_atoms: int, features: int, context: int, hidden: int, rank: int, num_steps: int) -> None:
        super().__init__()
        self.trunk = CountingTrunk(features, context).requires_grad_(False)
        self.step_embed = nn.Embedding(num_steps, hidden).requires_grad_(False)
        self.inp = LoRALinear(nn.Linear(num_atoms * 3 + context, hidden), rank)
        self.out = LoRALinear(nn.Linear(hidden, num_atoms * 3), rank)
        self.confidence = LoRALinear(nn.Linear(hidden, 1), rank)

    def hidden(self, x: Tensor, context: Tensor, steps: Tensor) -> Tensor:
        """``[b, t, H]`` from ``x`` ``[b, t, N, 3]``, ``context`` ``[b, C]`` and ``steps`` ``[t]``."""
        ctx = context.unsqueeze(1).expand(-1, x.shape[1], -1)
        return torch.tanh(self.inp(torch.cat([x.flatten(2), ctx], dim=-1)) + self.step_embed(steps))

    def forward(self, x: Tensor, context: Tensor, steps: Tensor) -> Tensor:
        """Predicted clean structure ``[b, t, N, 3]``."""
        return self.out(self.hidden(x, context, steps)).view_as(x)

    def adapters(self) -> list[LoRALinear]:
        return [m for m in self.modules() if isinstance(m, LoRALinear)]


class StructurePolicy:
    """``x_0 ~ N(0, I)``; step ``t``: ``x_{t+1} ~ N(x_t + gamma (D(x_t) - x_t), std_t^2 I)`` with a
    fixed ``std_t`` schedule. Adapters train; the reference is the same net with adapters off."""

    def __init__(self, num_atoms: int = 4, features: int = 6, context: int = 8, hidden: int = 48, rank: int = 4,
                 stds: tuple[float, ...] = (0.5, 0.35, 0.2, 0.1), gamma: float = 0.6) -> None:
        self.module = StructureNet(num_atoms, features, context, hidden, rank, len(stds))
        self.net: nn.Module = self.module
        self.stds, self.gamma = torch.tensor(stds), gamma

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]

    def state_dict(self) -> dict[str, Tensor]:
        return trainable_state_dict(self.module)

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        load_trainable_state_dict(self.module, state)

    def distribute(self, wrap: Callable[[nn.Module], nn.Module]) -> None:
        self.net = wrap(self.module)

    def to(self, device: torch.device) -> "StructurePolicy":
        self.module.to(device)
        self.stds = self.stds.to(device)
        return self

    @contextlib.contextmanager
    def adapters_off(self) -> Iterator[None]:
        for layer in self.module.adapters():
            layer.enabled = False
        try:
            yield
        finally:
            for layer in self.module.adapters():
                layer.enabled = True

    def step_mean(self, net: nn.Module, x: Tensor, context: Tensor, steps: Tensor) -> Tensor:
        """``[b, t, N, 3]`` mean of the next state from states ``x`` ``[b, t, N, 3]`` at ``steps``."""
        return x + self.gamma * (net(x, context, steps) - x)

    def gaussian_logp(self, x_next: Tensor, mean: Tensor, std: Tensor) -> Tensor:
        """``[b, t]`` log-density of ``x_next`` under ``N(mean, std^2 I)`` (``std`` ``[t]``)."""
        z = (x_next - mean) / std[:, None, None]
        per_dim = -0.5 * z**2 - torch.log(std)[:, None, None] - 0.5 * math.log(2 * math.pi)
        return per_dim.flatten(2).sum(dim=-1)

    @torch.no_grad()
    def rollout(self, prompts: dict[str, Tensor], group_size: int) -> Rollout:
        """Prompts: ``features`` ``[P, F]`` and the true ``target`` ``[P, N, 3]``. The trunk runs
        once on the P prompts; its context and the targets travel as group payload."""
        context = self.module.trunk(prompts["features"])  # [P, C]
        p, (n, _) = context.shape[0], prompts["target"].shape[1:]
        group_ids = torch.arange(p).repeat_interleave(group_size)
        x = torch.randn(p * group_size, 1, n, 3)
        states, logps = [x], []
        for t in range(len(self.stds)):
            steps = torch.tensor([t])
            mean = self.step_mean(self.module, x, context[group_ids], steps)
            x = mean + self.stds[t] * torch.randn_like(mean)
            logps.append(self.gaussian_logp(x, mean, self.stds[steps]))
            states.append(x)
        hidden = self.module.hidden(x, context[group_ids], torch.tensor([len(self.stds) - 1]))
        confidence = torch.sigmoid(self.module.confidence(hidden)).mean()
        return Rollout(group_ids=group_ids, logp_old=torch.cat(logps, dim=1),
                       step_mask=torch.ones(p * group_size, len(self.stds), dtype=torch.bool),
                       payload={"trajectory": torch.cat(states, dim=1)},
                       group_payload={"context": context, "target": prompts["target"]},
                       info={"metrics": {"rollout/confidence": float(confidence)}})

    def log_prob(self, rollout: Rollout, steps: Tensor, with_reference: bool) -> StepLogProbs:
        trajectory = rollout.payload["trajectory"]  # [b, T + 1, N, 3]
        x, x_next = trajectory[:, steps], trajectory[:, steps + 1]
        context = rollout.group_payload["context"][rollout.group_ids]
        mean = self.step_mean(self.net, x, context, steps)
        std = self.stds[steps]
        logp = self.gaussian_logp(x_next, mean, std)
        if not with_reference:
            return StepLogProbs(logp=logp)
        with torch.no_grad(), self.adapters_off():
            ref_mean = self.step_mean(self.module, x, context, steps)
        return StepLogProbs(logp=logp, ref_logp=self.gaussian_logp(x_next, ref_mean, std), mean=mean,
                            ref_mean=ref_mean, std=std.expand(x.shape[0], -1))


class StructureFitReward:
    """``fit`` = minus the RMSD of the final state to the prompt's true structure."""

    def __call__(self, rollout: Rollout) -> RewardOutput:
        final = rollout.payload["trajectory"][:, -1]
        target = rollout.group_payload["target"][rollout.group_ids]
        rmsd = ((final - target) ** 2).sum(dim=-1).mean(dim=-1).sqrt()
        return RewardOutput(channels={"fit": -rmsd})


class StructurePrompts:
    """Distinct prompts drawn (global RNG, reseeded by the trainer every iteration) from a fixed
    pool of ``num_targets`` feature vectors and their true structures (a fixed nonlinear map)."""

    def __init__(self, batch_size: int, group_size: int, num_targets: int = 4, features: int = 6,
                 num_atoms: int = 4) -> None:
        self.batch_size, self.group_size = batch_size, group_size
        g = torch.Generator().manual_seed(1234)
        self.features = torch.randn(num_targets, features, generator=g)
        mix = torch.randn(features, num_atoms * 3, generator=g) / math.sqrt(features)
        self.targets = (1.5 * torch.tanh(self.features @ mix)).view(num_targets, num_atoms, 3)

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        return self

    def __next__(self) -> dict[str, Tensor]:
        index = torch.randperm(self.features.shape[0])[: self.batch_size // self.group_size]
        return self.take(index)

    def take(self, index: Tensor) -> dict[str, Tensor]:
        return {"features": self.features[index], "target": self.targets[index]}
