"""Masked-LM rewards (lobster UME style) for SMILES, proteins and DNA: an engine reward and a TRL reward function.

Each completion's sequence and modality come from :func:`molgen_grpo.modality.parse_completion` (tags, then the
prompt's ``modality`` metadata, then the detector, as ``sources`` orders them). Sequences are scored per
modality in batches by :class:`molgen_grpo.mlm_scorer.MaskedLMScorer`. Failures are never a silent 0:

* a completion that cannot be parsed (``no_tag``, ``empty_tag``, ``too_short``, ``invalid_smiles``,
  ``unknown_modality``) or whose modality the model does not cover (``unsupported_modality``) gets
  ``penalty_for_invalid`` and is counted under its reason (logged as ``reward/failed_<reason>``); so does,
  with ``check_sequences``, a tagged sequence that is not valid for its modality (``invalid_smiles``: RDKit
  refuses it; ``invalid_protein`` / ``invalid_dna``: letters outside the alphabet), which lobster scores anyway,
  and, with ``match_metadata``, an answer in another modality than the prompt asked for (``wrong_modality``);
* a scorer exception leaves its batch NaN with the reason ``scorer_error``: the engine turns NaN into the
  trainer's ``failure_penalty`` and counts it; the TRL function returns None for those rows (TRL's
  "not scored") and keeps the count in :attr:`MaskedLMRewardFunction.failures`.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from elign.engine.errors import ConfigError
from elign.engine.rollout import Rollout, RewardOutput
from molgen_grpo.mlm_model import MODALITY_TOKENS, load_masked_lm
from molgen_grpo.mlm_scorer import MaskedLMScorer
from molgen_grpo.modality import MODALITIES, SOURCES, check_sequence, parse_completion

log = logging.getLogger(__name__)
SCORER_ERROR = "scorer_error"


class MaskedLMScore:
    """Completions -> (scores, reasons): the part shared by the engine reward and the TRL function.

    Args:
        path: a masked-LM folder (``package:`` paths resolve in the repo) or a Hub id (:func:`load_masked_lm`).
        mode, normalize, temperature, batch_size, max_positions, seed, max_length: the scorer's
            (:class:`molgen_grpo.mlm_scorer.MaskedLMScorer`).
        modality_tokens: ``ume`` (``<cls_smiles>`` ... before each sequence, the shipped model's and UME's
            convention), ``none``, or a mapping modality -> prefix text.
        modalities: the modalities this model scores; another modality is ``unsupported_modality``.
        sources: where a completion's modality comes from, in order (``tags``, ``metadata``, ``detect``).
        penalty_for_invalid: the reward of an unparseable completion (lobster v2: -5.0).
        check_sequences: also penalise sequences that are not valid for their modality (lobster scores them).
        match_metadata: penalise an answer whose tag names another modality than the prompt's metadata
            (``wrong_modality``): without it a policy can answer every prompt in the modality that scores best.
        trust_remote_code: passed to ``from_pretrained`` (Hub repos with their own model code).
        device: where the masked LM runs.
    """

    def __init__(self, path: str, mode: str = "unmasked_mean", normalize: str = "mean", temperature: float = 1.0,
                 batch_size: int = 8, max_positions: int | None = None, seed: int = 0,
                 modality_tokens: str | Mapping[str, str] = "ume", modalities: Sequence[str] = MODALITIES,
                 sources: Sequence[str] = ("tags",), penalty_for_invalid: float = -5.0,
                 check_sequences: bool = True, match_metadata: bool = False, trust_remote_code: bool = False,
                 device: str = "cpu", max_length: int = 512) -> None:
        bad = [m for m in modalities if m not in MODALITIES]
        if bad or not modalities:
            raise ConfigError("modalities", list(modalities), f"a non-empty subset of {MODALITIES}")
        if not sources or any(s not in SOURCES for s in sources):
            raise ConfigError("sources", list(sources), f"a non-empty ordered subset of {SOURCES}")
        if isinstance(modality_tokens, str):
            if modality_tokens not in ("ume", "none"):
                raise ConfigError("modality_tokens", modality_tokens, "ume, none or a mapping modality -> text")
            modality_tokens = MODALITY_TOKENS if modality_tokens == "ume" else {}
        self.modalities, self.sources = tuple(modalities), tuple(sources)
        self.penalty = float(penalty_for_invalid)
        if not isinstance(check_sequences, bool):
            raise ConfigError("check_sequences", check_sequences, "true or false")
        self.check_sequences = check_sequences
        if not isinstance(match_metadata, bool):
            raise ConfigError("match_metadata", match_metadata, "true or false")
        self.match_metadata = match_metadata
        model, tokenizer = load_masked_lm(path, trust_remote_code=trust_remote_code, device=device)
        self.scorer = MaskedLMScorer(model, tokenizer, mode=mode, normalize=normalize, temperature=temperature,
                                     batch_size=batch_size, max_positions=max_positions, seed=seed,
                                     modality_tokens=dict(modality_tokens), max_length=max_length)
        self.mode = mode

    def __call__(self, completions: Sequence[str], metadata: Sequence[str | None] | None = None,
                 ) -> tuple[np.ndarray, list[str | None], list[str | None]]:
        """``[n]`` float64 rewards (the penalty for unparseable rows, NaN where the scorer failed), each row's
        failure reason (None when scored) and modality."""
        metadata = list(metadata) if metadata is not None else [None] * len(completions)
        values = np.full(len(completions), np.nan)
        reasons: list[str | None] = [None] * len(completions)
        modalities: list[str | None] = [None] * len(completions)
        by_modality: dict[str, list[tuple[int, str]]] = {}
        for i, (text, meta) in enumerate(zip(completions, metadata)):
            parsed = parse_completion(text, meta, self.sources)
            modalities[i] = parsed.modality
            reason = parsed.reason or (None if parsed.modality in self.modalities else "unsupported_modality")
            if reason is None and self.check_sequences:
                reason = check_sequence(parsed.sequence, parsed.modality)
            if reason is None and self.match_metadata and meta is not None and parsed.modality != meta:
                reason = "wrong_modality"
            if reason is not None:
                values[i], reasons[i] = self.penalty, reason
            else:
                by_modality.setdefault(parsed.modality, []).append((i, parsed.sequence))
        for modality, rows in by_modality.items():
            for start in range(0, len(rows), self.scorer.batch_size):
                chunk = rows[start:start + self.scorer.batch_size]
                try:
                    scores = self.scorer.score([s for _, s in chunk], modality).numpy()
                except Exception as exc:  # noqa: BLE001 - any model failure is this batch's reason, not a crash
                    log.warning("masked-LM scorer failed on %d %s sequences: %s: %s", len(chunk), modality,
                                type(exc).__name__, exc)
                    scores = np.full(len(chunk), np.nan)
                for (i, _), score in zip(chunk, scores):
                    values[i] = score
                    if not np.isfinite(score):
                        values[i], reasons[i] = np.nan, SCORER_ERROR
        return values, reasons, modalities


class MaskedLMReward:
    """Engine reward (``reward=molgen/mlm``): one channel (``channel``, default ``mlm``) per completion.

    Reads ``rollout.info["completions"]`` and ``rollout.info["modalities"]`` (each sample's prompt metadata, as
    :class:`molgen_grpo.policy.Qwen3Policy` records it; absent = none); args as :class:`MaskedLMScore`
    plus ``channel``, the channel's name (to sum it with another reward's channels as weighted channels).
    """

    def __init__(self, channel: str = "mlm", **kwargs: Any) -> None:
        if not isinstance(channel, str) or not channel:
            raise ConfigError("channel", channel, "a channel name, e.g. mlm")
        self.channel = channel
        self.score = MaskedLMScore(**kwargs)

    def __call__(self, rollout: Rollout) -> RewardOutput:
        completions = rollout.info["completions"]
        values, reasons, modalities = self.score(completions, rollout.info.get("modalities"))
        failures = Counter(r for r in reasons if r is not None and r != SCORER_ERROR)
        scorer_failures = sum(r == SCORER_ERROR for r in reasons)
        if scorer_failures:  # NaN rows: the engine counts them as <channel>_failed and applies its penalty
            failures[SCORER_ERROR] = scorer_failures
        scored = [v for v, r in zip(values, reasons) if r is None]
        metrics = {f"{self.channel}_scored_frac": len(scored) / max(len(values), 1),
                   **{f"{self.channel}_frac_{m}": sum(x == m for x in modalities) / max(len(values), 1)
                      for m in MODALITIES}}
        if scored:
            metrics[f"{self.channel}_scored_mean"] = float(np.mean(scored))
            # A scored answer below the penalty teaches the policy that an invalid answer pays better.
            metrics[f"{self.channel}_below_penalty_frac"] = float(np.mean(np.array(scored) < self.score.penalty))
        return RewardOutput(channels={self.channel: torch.as_tensor(values, dtype=torch.float64)},
                            failures=dict(failures), metrics=metrics)


class MaskedLMRewardFunction:
    """A TRL reward function: ``f(prompts, completions, **kwargs) -> list[float | None]``.

    Conversational completions (lists of ``{"role", "content"}``) are scored on their last message. A
    dataset column ``modality`` arrives in ``kwargs`` and is the metadata source. Rows whose scorer batch
    failed return None (TRL: not scored by this function) and are counted in :attr:`failures`, as are the
    penalised rows. ``__name__`` (``mlm_<mode>``) is what TRL's logs show.
    """

    def __init__(self, **kwargs: Any) -> None:
        self.score = MaskedLMScore(**kwargs)
        self.__name__ = f"mlm_{self.score.mode}"
        self.failures: Counter[str] = Counter()

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float | None]:
        texts = [c[-1]["content"] if isinstance(c, list) else str(c) for c in completions]
        values, reasons, _ = self.score(texts, kwargs.get("modality"))
        self.failures.update(r for r in reasons if r is not None)
        return [None if r == SCORER_ERROR else float(v) for v, r in zip(values, reasons)]
