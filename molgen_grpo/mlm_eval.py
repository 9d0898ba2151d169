"""Held-out evaluation of a sequence-writing policy under a masked-LM reward (``evaluator=molgen/mlm``).

Every row of the held-out prompt splits is answered ``samples_per_prompt`` times after ``torch.manual_seed(seed)``
(the same completions for the same weights at every evaluation), and the answers are scored by the reward the run
trains on. Two kinds of figures, so that a rising reward cannot hide worse answers:

* ``mlm_reward``: the mean reward as trained (penalties included), ``mlm_scored_mean`` over the scored answers;
* ``tagged_frac`` (the earliest tag pair parses and is not empty), ``valid_frac`` (also a valid sequence of its
  modality: RDKit SMILES, amino-acid or ACGT letters) and ``on_modality_frac`` (also the prompt's modality).

Each is also given per prompt modality (``smiles/valid_frac``...).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from elign.engine.errors import ConfigError, check_int
from elign.engine.paths import resolve_package_path
from molgen_grpo.mlm_prompts import read_rows
from molgen_grpo.mlm_reward import MaskedLMReward, MaskedLMScore
from molgen_grpo.modality import MODALITIES, check_sequence, parse_completion
from molgen_grpo.policy import Prompt

__all__ = ["MaskedLMEvaluator", "answer_flags", "answer_rates", "sample_answers"]


def answer_flags(text: str, wanted: str | None) -> tuple[bool, bool, bool]:
    """``(tagged, valid, on_modality)`` of one answer (module docstring); each implies the one before."""
    parsed = parse_completion(text, None, ("tags",))
    tagged = parsed.reason is None
    valid = tagged and check_sequence(parsed.sequence, parsed.modality) is None
    return tagged, valid, valid and parsed.modality == wanted


def answer_rates(completions: Sequence[str], modalities: Sequence[str | None]) -> dict[str, float]:
    """Shares of ``completions`` that are tagged, valid and on the prompt's modality (:func:`answer_flags`)."""
    flags = np.array([answer_flags(t, m) for t, m in zip(completions, modalities)], dtype=float).reshape(-1, 3)
    means = flags.mean(0) if len(flags) else np.full(3, np.nan)
    return {"tagged_frac": float(means[0]), "valid_frac": float(means[1]), "on_modality_frac": float(means[2])}


@torch.no_grad()
def sample_answers(policy: Any, rows: Sequence[dict[str, Any]], samples_per_prompt: int, seed: int) -> list[str]:
    """``samples_per_prompt`` completions per row (row-major) after ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    prompts = [Prompt(i, row["prompt"], row["modality"]) for i, row in enumerate(rows)]
    return list(policy.rollout(prompts, samples_per_prompt).info["completions"])


class MaskedLMEvaluator:
    """The engine's evaluator: held-out masked-LM reward and answer validity (module docstring).

    Args:
        reward: the :class:`molgen_grpo.mlm_reward.MaskedLMReward` (or its ``MaskedLMScore``) that scores the
            answers; the recipe passes a second instance of the run's reward (``${reward}``).
        prompts: a prompt dataset folder (:mod:`molgen_grpo.mlm_prompts`) or a JSON / JSONL file of rows.
        splits: the folder's splits to prompt (ignored for a file).
        samples_per_prompt: answers per prompt row.
        seed: sampling seed, the same at every evaluation.
    """

    def __init__(self, reward: MaskedLMReward | MaskedLMScore, prompts: str, splits: Sequence[str] = ("test",),
                 samples_per_prompt: int = 4, seed: int = 1234) -> None:
        score = reward.score if isinstance(reward, MaskedLMReward) else reward
        if not isinstance(score, MaskedLMScore):
            raise ConfigError("reward", type(reward).__name__,
                              "a MaskedLMReward (e.g. ${reward} with reward=molgen/mlm)")
        self.score = score
        resolved = Path(resolve_package_path(prompts))
        if isinstance(splits, str) or not splits:
            raise ConfigError("splits", splits, "a non-empty list of split names, e.g. [test]")
        files = [resolved / f"{split}.json" for split in splits] if resolved.is_dir() else [resolved]
        self.rows = [row for path in files for row in read_rows(path)]
        self.samples_per_prompt = check_int("samples_per_prompt", samples_per_prompt, 1)
        self.seed = check_int("seed", seed)

    def __call__(self, policy: Any) -> dict[str, float]:
        completions = sample_answers(policy, self.rows, self.samples_per_prompt, self.seed)
        wanted = [row["modality"] for row in self.rows for _ in range(self.samples_per_prompt)]
        return self.metrics(completions, wanted)

    def metrics(self, completions: Sequence[str], wanted: Sequence[str]) -> dict[str, float]:
        """The figures of the module docstring for answers ``completions`` to prompts of modality ``wanted``."""
        values, reasons, _ = self.score(completions, wanted)
        values = np.where(np.isnan(values), self.score.penalty, values)  # a scorer failure counts as a penalty
        out: dict[str, float] = {}
        for prefix, keep in [("", np.ones(len(values), bool)),
                             *((f"{m}/", np.array([w == m for w in wanted])) for m in MODALITIES)]:
            if not keep.any():
                continue
            scored = [v for v, r, k in zip(values, reasons, keep) if k and r is None]
            out[f"{prefix}mlm_reward"] = float(values[keep].mean())
            out[f"{prefix}mlm_scored_mean"] = float(np.mean(scored)) if scored else float("nan")
            rates = answer_rates([c for c, k in zip(completions, keep) if k], [w for w, k in zip(wanted, keep) if k])
            out.update({f"{prefix}{key}": value for key, value in rates.items()})
        out["answers"] = float(len(completions))
        return out
