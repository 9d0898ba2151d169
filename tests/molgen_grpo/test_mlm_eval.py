"""Held-out masked-LM evaluation: answer flags and rates on hand cases, the metrics against the reward's own
scores, and reproducible seeded sampling through the evaluator on a real (tiny, random) writer policy."""

import json

import numpy as np
import pytest
import torch

from elign.engine.errors import ConfigError
from molgen_grpo.mlm_eval import MaskedLMEvaluator, answer_flags, answer_rates
from molgen_grpo.mlm_reward import MaskedLMReward, MaskedLMScore

SHIPPED_MLM = "package:molgen_grpo/weights/mlm_tiny"
PROMPTS = "package:molgen_grpo/data/mlm_prompts"


@pytest.mark.parametrize("text, wanted, flags", [
    ("<smiles>CCO</smiles>", "smiles", (True, True, True)),
    ("<smiles>C1CC</smiles>", "smiles", (True, False, False)),
    ("<dna>ACGT</dna>", "protein", (True, True, False)),
    ("<amino_acid>MKV</amino_acid>", "protein", (True, True, True)),
    ("<protein>MKVZ</protein>", "protein", (True, False, False)),
    ("<dna></dna>", "dna", (False, False, False)),
    ("ACGTACGT", "dna", (False, False, False)),
])
def test_answer_flags(text, wanted, flags):
    assert answer_flags(text, wanted) == flags


def test_answer_rates_are_shares():
    rates = answer_rates(["<smiles>CCO</smiles>", "<smiles>C1CC</smiles>", "<dna>ACGT</dna>", "none"],
                         ["smiles", "smiles", "protein", "dna"])
    assert rates == {"tagged_frac": 0.75, "valid_frac": 0.5, "on_modality_frac": 0.25}


def test_metrics_match_the_reward_scores_overall_and_per_modality():
    evaluator = MaskedLMEvaluator(MaskedLMReward(path=SHIPPED_MLM, temperature=0.1), PROMPTS, splits=["test"])
    texts = ["<smiles>CCO</smiles>", "no tag", "<protein>MKVLA</protein>", "<dna>ACGTAC</dna>"]
    wanted = ["smiles", "smiles", "protein", "dna"]
    values, reasons, _ = evaluator.score(texts, wanted)
    out = evaluator.metrics(texts, wanted)
    assert reasons == [None, "no_tag", None, None] and values[1] == -5.0
    assert out["mlm_reward"] == pytest.approx(values.mean())
    assert out["mlm_scored_mean"] == pytest.approx(values[[0, 2, 3]].mean())
    assert out["smiles/mlm_reward"] == pytest.approx(values[:2].mean())
    assert out["smiles/mlm_scored_mean"] == pytest.approx(values[0])
    assert out["smiles/valid_frac"] == 0.5 and out["dna/valid_frac"] == 1.0 and out["valid_frac"] == 0.75
    assert out["answers"] == 4.0


def test_evaluator_reads_splits_samples_reproducibly_and_checks_its_reward():
    from molgen_grpo.mlm_writer import build_writer_tokenizer
    from molgen_grpo.policy import Qwen3Policy

    tokenizer = build_writer_tokenizer()
    torch.manual_seed(0)
    policy = Qwen3Policy(tokenizer, {"init": "random", "hidden_size": 32, "num_hidden_layers": 1,
                                     "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16,
                                     "intermediate_size": 32, "max_position_embeddings": 256},
                         stop_tokens=["<|endoftext|>"], max_new_tokens=6)
    score = MaskedLMScore(path=SHIPPED_MLM)
    evaluator = MaskedLMEvaluator(score, PROMPTS, splits=["validation", "test"], samples_per_prompt=2, seed=3)
    assert len(evaluator.rows) == 30
    first, second = evaluator(policy), evaluator(policy)
    assert json.dumps(first, sort_keys=True) == json.dumps(second, sort_keys=True)  # NaN-safe equality
    assert first["answers"] == 60.0
    # A random writer tags nothing: every answer earns the penalty.
    assert first["tagged_frac"] == 0.0 and first["mlm_reward"] == -5.0 and np.isnan(first["mlm_scored_mean"])
    with pytest.raises(ConfigError, match="reward"):
        MaskedLMEvaluator(object(), PROMPTS)
    with pytest.raises(ConfigError, match="splits"):
        MaskedLMEvaluator(score, PROMPTS, splits="test")
