"""A variable-length token domain: a tiny autoregressive GRU that writes completions ending in EOS.

It exists to show the engine serves a language-model-like policy without knowing it: completions
have different lengths, the steps after EOS are padding (``step_mask`` False), and the reward
reads the text. Vocabulary: ``NUM_CONTENT`` content tokens, then EOS; PAD and BOS are input-only.
"""

from __future__ import annotations

import copy
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from elign.engine.rollout import RewardOutput, Rollout, StepLogProbs

NUM_CONTENT = 3
EOS = NUM_CONTENT  # the last output token
PAD = NUM_CONTENT + 1  # written after EOS; never sampled
BOS = NUM_CONTENT + 2  # the input before the first token
TARGET = 0  # the content token the reward asks for


class TinyLM(nn.Module):
    """Prompt-conditioned GRU language model: ``h0 = prompt_embedding(prompt)``, inputs are the
    previous tokens (BOS first), outputs logits over content tokens and EOS."""

    def __init__(self, num_prompts: int, hidden: int) -> None:
        super().__init__()
        self.prompt = nn.Embedding(num_prompts, hidden)
        self.embed = nn.Embedding(NUM_CONTENT + 3, hidden)
        self.gru = nn.GRU(hidden, hidden, batch_first=True)
        self.head = nn.Linear(hidden, NUM_CONTENT + 1)

    def forward(self, prompts: Tensor, inputs: Tensor, hidden: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Logits ``[b, s, V]`` for inputs ``[b, s]`` and the final hidden state ``[1, b, H]``;
        ``hidden`` None starts from the prompt's embedding (``prompts`` ``[b]`` long)."""
        if hidden is None:
            hidden = self.prompt(prompts).unsqueeze(0)
        out, hidden = self.gru(self.embed(inputs), hidden)
        return self.head(out), hidden


class TokenPolicy:
    """Samples completions of at most ``max_len`` tokens with temperature; the reference for the
    KL is a frozen copy of the initial model. ``padding_logp`` is the log-prob reported after EOS
    (0: padding is certain; -inf: padding is impossible, as some LM code masks it)."""

    def __init__(self, num_prompts: int = 4, hidden: int = 16, max_len: int = 8, temperature: float = 1.0,
                 dtype: torch.dtype = torch.float32, padding_logp: float = 0.0) -> None:
        self.module = TinyLM(num_prompts, hidden).to(dtype)
        self.reference = copy.deepcopy(self.module).requires_grad_(False)
        self.net: nn.Module = self.module
        self.max_len, self.temperature, self.padding_logp = max_len, temperature, padding_logp

    def distribute(self, wrap: Callable[[nn.Module], nn.Module]) -> None:
        self.net = wrap(self.module)

    def to(self, device: torch.device) -> "TokenPolicy":
        self.module.to(device)
        self.reference.to(device)
        return self

    @torch.no_grad()
    def rollout(self, prompts: Tensor, group_size: int) -> Rollout:
        """``group_size`` completions per prompt (``prompts`` ``[P]`` long). Payload: ``prompt``
        ``[B]`` and ``tokens`` ``[B, T]`` (PAD after EOS); ``logp_old`` is ``padding_logp`` after EOS."""
        prompt = prompts.repeat_interleave(group_size)
        b = prompt.shape[0]
        tokens = torch.full((b, self.max_len), PAD, dtype=torch.long)
        logp = torch.full((b, self.max_len), self.padding_logp, dtype=self.module.head.weight.dtype)
        done = torch.zeros(b, dtype=torch.bool)
        inputs, hidden = torch.full((b, 1), BOS, dtype=torch.long), None
        for t in range(self.max_len):
            logits, hidden = self.module(prompt, inputs, hidden)
            step_logp = torch.log_softmax(logits[:, 0] / self.temperature, dim=-1)
            token = torch.multinomial(step_logp.exp(), 1).squeeze(1)
            tokens[:, t] = torch.where(done, PAD, token)
            logp[:, t] = torch.where(done, self.padding_logp, step_logp.gather(1, token[:, None]).squeeze(1))
            done = done | (token == EOS)
            inputs = token[:, None]
        # A step is trained up to and including the EOS token; padding after it is not.
        step_mask = (tokens != PAD)
        return Rollout(group_ids=torch.arange(prompts.shape[0]).repeat_interleave(group_size), logp_old=logp,
                       step_mask=step_mask, payload={"prompt": prompt, "tokens": tokens})

    def log_prob(self, rollout: Rollout, steps: Tensor, with_reference: bool) -> StepLogProbs:
        """Teacher-forced log-probs of the recorded tokens at ``steps`` (``padding_logp`` after EOS); the
        prefix up to the last asked step is run, nothing after it."""
        logp = self._token_logp(self.net, rollout, steps)
        if not with_reference:
            return StepLogProbs(logp=logp)
        with torch.no_grad():
            ref_logp = self._token_logp(self.reference, rollout, steps)
        return StepLogProbs(logp=logp, ref_logp=ref_logp)

    def _token_logp(self, model: nn.Module, rollout: Rollout, steps: Tensor) -> Tensor:
        tokens = rollout.payload["tokens"][:, : int(steps.max()) + 1]
        inputs = torch.cat([torch.full_like(tokens[:, :1], BOS), tokens[:, :-1]], dim=1)
        logits, _ = model(rollout.payload["prompt"], inputs)
        all_logp = torch.log_softmax(logits / self.temperature, dim=-1)
        real = tokens != PAD
        token_logp = all_logp.gather(2, torch.where(real, tokens, EOS).unsqueeze(2)).squeeze(2)
        return torch.where(real, token_logp, torch.full_like(token_logp, self.padding_logp))[:, steps]


def completion_lengths(tokens: Tensor) -> Tensor:
    """``[B]`` content tokens before EOS (EOS and padding excluded)."""
    content = (tokens != PAD) & (tokens != EOS)
    return content.sum(dim=1)


class TargetTextReward:
    """``score`` = fraction of the completion's content tokens equal to TARGET (0 for an empty
    one) plus ``length_weight * length / max_len``: long completions of the target token win."""

    def __init__(self, max_len: int, length_weight: float = 0.5) -> None:
        self.max_len, self.length_weight = max_len, length_weight

    def __call__(self, rollout: Rollout) -> RewardOutput:
        tokens = rollout.payload["tokens"]
        length = completion_lengths(tokens).float()
        target = (tokens == TARGET).sum(dim=1).float()
        fraction = torch.where(length > 0, target / length.clamp(min=1), torch.zeros_like(length))
        score = fraction + self.length_weight * length / self.max_len
        return RewardOutput(channels={"score": score}, metrics={"length": float(length.mean())})


class TokenPrompts:
    """``batch_size // group_size`` prompt ids per batch, drawn from the global RNG (which the
    trainer reseeds every iteration, so resumed runs draw the same prompts)."""

    def __init__(self, batch_size: int, group_size: int, num_prompts: int) -> None:
        self.batch_size, self.group_size, self.num_prompts = batch_size, group_size, num_prompts

    def __iter__(self) -> Iterator[Tensor]:
        return self

    def __next__(self) -> Tensor:
        return torch.randint(0, self.num_prompts, (self.batch_size // self.group_size,))
