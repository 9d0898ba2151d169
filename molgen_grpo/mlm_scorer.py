"""How likely a masked language model finds a sequence: lobster's unmasked mean and the exact pseudo-likelihood.

* ``unmasked_mean`` (lobster's ``UME.compute_pseudo_likelihood``, lm_grpo.md §2.2): one forward pass with
  nothing masked; the log-probability of every visible token, special tokens included, averaged (or summed)
  over the non-pad positions. Cheap, but the model sees each token it scores: biased toward 0.
* ``masked_pll`` (Salazar et al. 2020): one copy per scored position with that token replaced by the mask
  token, all copies batched; the log-probability of the true token at its masked position, over the
  sequence's non-special tokens. ``max_positions`` caps the copies per sequence: longer sequences score a
  seeded random subset of positions, and ``normalize: sum`` then scales the subset's mean by the number of
  positions (an unbiased estimate of the full sum).

The score is divided by ``temperature`` (lobster: 0.1, i.e. ×10). Math on tensors is in the pure functions;
:class:`MaskedLMScorer` tokenizes, batches and runs the model under ``no_grad``.
"""

from __future__ import annotations

import zlib
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from elign.engine.errors import ConfigError, check_int, check_range

MODES = ("unmasked_mean", "masked_pll")
NORMALIZE = ("mean", "sum")


def token_log_probs(logits: Tensor, ids: Tensor) -> Tensor:
    """``log p(ids[b, t])`` under ``logits`` ``[B, T, V]`` (float32 softmax) -> ``[B, T]``."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)


def reduce_scores(values: Tensor, mask: Tensor, normalize: str) -> Tensor:
    """Sum (``sum``) or mean (``mean``) of ``values`` ``[B, T]`` over ``mask`` ``[B, T]`` -> ``[B]``; a row with
    no position is NaN (no score, not 0)."""
    mask = mask.to(values.dtype)
    total = (values * mask).sum(-1)
    count = mask.sum(-1)
    if normalize == "sum":
        return torch.where(count > 0, total, torch.full_like(total, float("nan")))
    return total / count.where(count > 0, torch.full_like(count, float("nan")))


def masked_copies(ids: Tensor, positions: Tensor, mask_id: int) -> Tensor:
    """``[P, T]`` copies of ``ids`` ``[T]``, copy ``i`` with ``positions[i]`` replaced by ``mask_id``."""
    copies = ids.unsqueeze(0).repeat(positions.numel(), 1)
    copies[torch.arange(positions.numel()), positions] = mask_id
    return copies


def choose_positions(candidates: Tensor, max_positions: int | None, seed: int, key: str) -> Tensor:
    """All ``candidates`` ``[L]`` or, above ``max_positions``, a subset drawn from a generator seeded by
    ``seed`` and ``key`` (the sequence): the same sequence gets the same positions in every call."""
    if max_positions is None or candidates.numel() <= max_positions:
        return candidates
    generator = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(key.encode())) % (2**63))
    pick = torch.randperm(candidates.numel(), generator=generator)[:max_positions]
    return candidates[pick.sort().values]


class MaskedLMScorer:
    """Scores sequences with a transformers masked LM (module docstring).

    Args:
        model: an ``AutoModelForMaskedLM``-style module: ``model(input_ids=, attention_mask=).logits``.
        tokenizer: its tokenizer (a mask token for ``masked_pll``; ``return_special_tokens_mask`` support).
        mode: ``unmasked_mean`` (lobster-compatible) or ``masked_pll`` (exact).
        normalize: ``mean`` (per scored token) or ``sum``.
        temperature: the score is divided by this (> 0).
        batch_size: sequences per forward (``unmasked_mean``) or masked copies per forward (``masked_pll``).
        max_positions: ``masked_pll``: most masked copies per sequence; None = every position.
        seed: seed of the position subsampling.
        modality_tokens: modality -> text put before the sequence (e.g. the tiny UME-style model's
            ``<cls_smiles>``); None = the sequence alone. Registered as special tokens, they are never scored
            by ``masked_pll``.
        max_length: truncation length in tokens.
    """

    def __init__(self, model: Any, tokenizer: Any, mode: str = "unmasked_mean", normalize: str = "mean",
                 temperature: float = 1.0, batch_size: int = 8, max_positions: int | None = None, seed: int = 0,
                 modality_tokens: Mapping[str, str] | None = None, max_length: int = 512) -> None:
        if mode not in MODES:
            raise ConfigError("mode", mode, f"one of {MODES}")
        if normalize not in NORMALIZE:
            raise ConfigError("normalize", normalize, f"one of {NORMALIZE}")
        self.temperature = check_range("temperature", temperature, 0, low_open=True)
        self.batch_size = check_int("batch_size", batch_size, 1)
        self.max_positions = check_int("max_positions", max_positions, 1, allow_none=True, none_means="all")
        self.max_length = check_int("max_length", max_length, 2)
        if mode == "masked_pll" and tokenizer.mask_token_id is None:
            raise ConfigError("mode", mode, "unmasked_mean (the tokenizer has no mask token)")
        self.model, self.tokenizer, self.mode, self.normalize = model.eval(), tokenizer, mode, normalize
        self.seed = int(seed)
        # Special tokens the caller puts in the text (the modality token) are not in every tokenizer's mask.
        self.special_ids = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)
        self.modality_tokens = dict(modality_tokens or {})
        for p in self.model.parameters():
            p.requires_grad_(False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode(self, sequences: Sequence[str], modality: str) -> dict[str, Tensor]:
        """Padded ``input_ids``, ``attention_mask``, ``special_tokens_mask`` ``[n, T]``."""
        prefix = self.modality_tokens.get(modality, "")
        enc = self.tokenizer([prefix + s for s in sequences], padding=True, truncation=True,
                             max_length=self.max_length, return_tensors="pt", return_special_tokens_mask=True)
        return {k: enc[k] for k in ("input_ids", "attention_mask", "special_tokens_mask")}

    @torch.no_grad()
    def score(self, sequences: Sequence[str], modality: str) -> Tensor:
        """``[n]`` float64 scores / temperature (NaN for a sequence with nothing to score)."""
        if not sequences:
            return torch.zeros(0, dtype=torch.float64)
        enc = self.encode(sequences, modality)
        raw = self._unmasked(enc) if self.mode == "unmasked_mean" else self._masked(enc, sequences)
        return raw.double() / self.temperature

    def _logits(self, ids: Tensor, mask: Tensor) -> Tensor:
        return self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits.cpu()

    def _unmasked(self, enc: Mapping[str, Tensor]) -> Tensor:
        out = []
        for start in range(0, enc["input_ids"].shape[0], self.batch_size):
            ids = enc["input_ids"][start:start + self.batch_size]
            mask = enc["attention_mask"][start:start + self.batch_size]
            out.append(reduce_scores(token_log_probs(self._logits(ids, mask), ids), mask, self.normalize))
        return torch.cat(out)

    def _masked(self, enc: Mapping[str, Tensor], sequences: Sequence[str]) -> Tensor:
        rows, owners, where, truths, counts = [], [], [], [], []
        for i, text in enumerate(sequences):
            real = enc["attention_mask"][i].bool()  # either padding side
            ids = enc["input_ids"][i][real]
            special = enc["special_tokens_mask"][i][real].bool() | torch.isin(ids, self.special_ids)
            candidates = (~special).nonzero().flatten()
            positions = choose_positions(candidates, self.max_positions, self.seed, text)
            counts.append(candidates.numel())
            rows.append(masked_copies(ids, positions, self.tokenizer.mask_token_id))
            truths.append(ids[positions])
            owners += [i] * positions.numel()
            where.append(positions)
        logp = torch.empty(len(owners))
        copies, positions = _pad_rows(rows, self.tokenizer.pad_token_id), torch.cat(where)
        truth = torch.cat(truths)
        for start in range(0, copies["input_ids"].shape[0], self.batch_size):
            sl = slice(start, start + self.batch_size)
            logits = self._logits(copies["input_ids"][sl], copies["attention_mask"][sl])
            at = logits[torch.arange(logits.shape[0]), positions[sl]]  # [b, V] at each copy's masked position
            logp[sl] = torch.log_softmax(at.float(), -1).gather(-1, truth[sl].unsqueeze(-1)).squeeze(-1)
        owner = torch.tensor(owners, dtype=torch.long)
        scores = torch.full((len(sequences),), float("nan"))
        for i in range(len(sequences)):
            mine = logp[owner == i]
            if mine.numel():
                scores[i] = mine.mean() if self.normalize == "mean" else mine.mean() * counts[i]
        return scores


def _pad_rows(rows: list[Tensor], pad_id: int | None) -> dict[str, Tensor]:
    """Stack ``[P_i, T_i]`` blocks into ``input_ids`` / ``attention_mask`` ``[sum P_i, max T_i]``."""
    width = max((r.shape[1] for r in rows if r.numel()), default=1)
    ids = torch.full((sum(r.shape[0] for r in rows), width), int(pad_id or 0), dtype=torch.long)
    mask = torch.zeros_like(ids)
    at = 0
    for r in rows:
        ids[at:at + r.shape[0], :r.shape[1]] = r
        mask[at:at + r.shape[0], :r.shape[1]] = 1
        at += r.shape[0]
    return {"input_ids": ids, "attention_mask": mask}
