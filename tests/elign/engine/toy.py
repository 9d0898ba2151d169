"""A categorical sequence policy: the smallest non-diffusion domain, used to prove that the
engine is domain-free (same Trainer, same FED-GRPO strategy, no chemistry)."""

from __future__ import annotations

import copy
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from elign.engine.rollout import RewardOutput, Rollout, StepLogProbs


class TokenTable(nn.Module):
    """Independent logits per position: ``[T, V]``."""

    def __init__(self, num_steps: int, vocab: int) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(num_steps, vocab))

    def forward(self, steps: Tensor) -> Tensor:
        return self.logits[steps]


class CategoricalPolicy:
    def __init__(self, num_steps: int = 6, vocab: int = 4) -> None:
        self.module = TokenTable(num_steps, vocab)
        self.reference = copy.deepcopy(self.module).requires_grad_(False)
        self.net: nn.Module = self.module
        self.num_steps = num_steps

    def distribute(self, wrap: Callable[[nn.Module], nn.Module]) -> None:
        self.net = wrap(self.module)

    def to(self, device: torch.device) -> "CategoricalPolicy":
        self.module.to(device)
        self.reference.to(device)
        return self

    @torch.no_grad()
    def rollout(self, prompts: Tensor, group_size: int) -> Rollout:
        b = prompts.shape[0] * group_size
        steps = torch.arange(self.num_steps)
        logp_all = torch.log_softmax(self.net(steps), dim=-1)  # [T, V]
        tokens = torch.distributions.Categorical(logits=logp_all).sample((b,))  # [B, T]
        logp = logp_all.gather(1, tokens.T).T
        return Rollout(group_ids=torch.arange(prompts.shape[0]).repeat_interleave(group_size),
                       logp_old=logp, step_mask=torch.ones(b, self.num_steps, dtype=torch.bool),
                       payload={"tokens": tokens})

    def log_prob(self, rollout: Rollout, steps: Tensor, with_reference: bool) -> StepLogProbs:
        logp_all = torch.log_softmax(self.net(steps), dim=-1)  # [t, V]
        tokens = rollout.payload["tokens"][:, steps]  # [b, t]
        logp = logp_all.unsqueeze(0).expand(tokens.shape[0], -1, -1).gather(2, tokens.unsqueeze(2)).squeeze(2)
        if not with_reference:
            return StepLogProbs(logp=logp)
        with torch.no_grad():
            ref = torch.log_softmax(self.reference(steps), dim=-1)
        ref_logp = ref.unsqueeze(0).expand(tokens.shape[0], -1, -1).gather(2, tokens.unsqueeze(2)).squeeze(2)
        return StepLogProbs(logp=logp, ref_logp=ref_logp)


class TableGradients:
    """Per-sample gradient sums ``[B, T, V]`` of the token table (``PerSampleGradients``)."""

    def __init__(self, param: nn.Parameter, per_sample: Tensor) -> None:
        self.param, self.per_sample = param, per_sample

    def accumulate(self, weights: Tensor) -> None:
        g = torch.einsum("b,btv->tv", weights.to(self.per_sample), self.per_sample)
        self.param.grad = g if self.param.grad is None else self.param.grad + g


class FusedCategoricalPolicy(CategoricalPolicy):
    """The toy policy with ``rollout_with_grads`` (the engine's ``FusedPolicy``): one autograd call per
    sample, which is the definition of a per-sample gradient."""

    def rollout_with_grads(self, prompts: Tensor, group_size: int) -> tuple[Rollout, TableGradients]:
        rollout = self.rollout(prompts, group_size)
        return rollout, self.gradients(rollout)

    def gradients(self, rollout: Rollout) -> TableGradients:
        """Per-sample sums of the log-prob gradients over the trained steps of ``rollout``."""
        steps = torch.arange(self.num_steps)
        logp_all = torch.log_softmax(self.module(steps), dim=-1)  # [T, V], the undistributed module
        per_sample = []
        for tokens, mask in zip(rollout.payload["tokens"], rollout.step_mask):
            logp = logp_all.gather(1, tokens.unsqueeze(1)).squeeze(1)
            per_sample.append(torch.autograd.grad((logp * mask).sum(), self.module.logits, retain_graph=True)[0])
        return TableGradients(self.module.logits, torch.stack(per_sample))


class TargetTokenReward:
    """Fraction of positions that hold token 0."""

    def __call__(self, rollout: Rollout) -> RewardOutput:
        tokens = rollout.payload["tokens"]
        return RewardOutput(channels={"score": (tokens == 0).float().mean(dim=1)})


class ToyPrompts:
    def __init__(self, batch_size: int, group_size: int) -> None:
        self.batch_size, self.group_size = batch_size, group_size

    def __iter__(self) -> Iterator[Tensor]:
        return self

    def __next__(self) -> Tensor:
        return torch.zeros(self.batch_size // self.group_size, dtype=torch.long)


def supervised_loss(self, batch: Tensor) -> tuple[Tensor, dict[str, float]]:
    """Cross-entropy of the per-position logits against data sequences ``[b, T]``."""
    logits = self.net(torch.arange(self.num_steps))  # [T, V]
    logp = torch.log_softmax(logits, dim=-1)
    nll = -logp.unsqueeze(0).expand(batch.shape[0], -1, -1).gather(2, batch.unsqueeze(2)).mean()
    return nll, {"nll": float(nll.detach()), "num_samples": float(batch.shape[0]), "num_tokens": float(batch.numel())}


CategoricalPolicy.supervised_loss = supervised_loss  # type: ignore[attr-defined]
