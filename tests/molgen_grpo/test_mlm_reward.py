"""Masked-LM rewards: tags and penalties with counted reasons, scorer failures as NaN (engine) / None (TRL),
the TRL signature and name, and models loaded from a save_pretrained folder."""

import numpy as np
import pytest
import torch

from elign.engine.errors import ConfigError
from elign.engine.rollout import Rollout
from molgen_grpo.mlm_model import MODALITY_TOKENS, build_char_tokenizer, build_tiny_mlm, load_masked_lm
from molgen_grpo.mlm_reward import SCORER_ERROR, MaskedLMReward, MaskedLMRewardFunction, MaskedLMScore
from molgen_grpo.policy import Prompt

COMPLETIONS = ["<smiles>CCO</smiles>", "<protein> </protein>", "no tag here", "<amino_acid>MKV</amino_acid>",
               "x <dna>ACGTT</dna>"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mlm")
    tokenizer = build_char_tokenizer(["CCOc1()=N", "MKVACDEFGHILNPQRSTWY", "ACGT"])
    model = build_tiny_mlm(len(tokenizer), tokenizer.pad_token_id, hidden_size=32, num_layers=1, num_heads=2,
                           intermediate_size=32, seed=0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_loader_reads_a_saved_folder_and_names_a_bad_path(model_dir, tmp_path):
    model, tokenizer = load_masked_lm(str(model_dir))
    assert tokenizer.mask_token == "<mask>" and model.config.model_type == "modernbert"
    assert all(tokenizer.convert_tokens_to_ids(t) != tokenizer.unk_token_id for t in MODALITY_TOKENS.values())
    with pytest.raises(ConfigError, match="path"):
        load_masked_lm(str(tmp_path))  # a folder without config.json


def test_tags_penalties_and_reasons(model_dir):
    score = MaskedLMScore(str(model_dir), modalities=["smiles", "protein"], penalty_for_invalid=-5.0)
    values, reasons, modalities = score(COMPLETIONS)
    assert reasons == [None, "empty_tag", "no_tag", None, "unsupported_modality"]
    assert modalities == ["smiles", None, None, "protein", "dna"]
    assert values[1] == values[2] == values[4] == -5.0
    direct = score.scorer.score(["CCO"], "smiles")
    assert values[0] == pytest.approx(float(direct)) and np.isfinite(values[3]) and values[3] != -5.0
    # Metadata after tags: the untagged row is scored as the prompt's modality.
    values, reasons, _ = MaskedLMScore(str(model_dir), sources=["tags", "metadata"])(
        ["MKVAC"], metadata=["protein"])
    assert reasons == [None] and values[0] == pytest.approx(float(score.scorer.score(["MKVAC"], "protein")))


def test_engine_reward_counts_failures_and_a_scorer_error_is_nan(model_dir, monkeypatch):
    reward = MaskedLMReward(path=str(model_dir), channel="mlm")
    prompts = [Prompt(i, "p", "smiles") for i in range(len(COMPLETIONS))]
    rollout = Rollout(group_ids=torch.zeros(len(COMPLETIONS), dtype=torch.long), logp_old=torch.zeros(5, 1),
                      step_mask=torch.ones(5, 1, dtype=torch.bool), info={"completions": COMPLETIONS,
                                                                          "prompts": prompts})
    real = reward.score.scorer.score

    def failing(sequences, modality):
        if modality == "protein":
            raise RuntimeError("out of memory")
        return real(sequences, modality)

    monkeypatch.setattr(reward.score.scorer, "score", failing)
    out = reward(rollout)
    values = out.channels["mlm"]
    assert out.failures == {"empty_tag": 1, "no_tag": 1, SCORER_ERROR: 1}
    assert torch.isnan(values[3]) and torch.isfinite(values[[0, 1, 2, 4]]).all() and values[1] == -5.0
    assert out.metrics["mlm_scored_frac"] == pytest.approx(2 / 5)  # CCO and the DNA row


def test_trl_function_signature_name_and_none_for_failed_rows(model_dir, monkeypatch):
    fn = MaskedLMRewardFunction(path=str(model_dir), mode="masked_pll", modalities=["smiles", "dna"])
    assert fn.__name__ == "mlm_masked_pll"
    conversational = [[{"role": "assistant", "content": "<smiles>CCO</smiles>"}]]
    out = fn(prompts=["p"], completions=conversational)
    assert isinstance(out[0], float) and np.isfinite(out[0])
    monkeypatch.setattr(fn.score.scorer, "score", lambda s, m: (_ for _ in ()).throw(RuntimeError("boom")))
    assert fn(prompts=["p", "p"], completions=["<dna>ACGT</dna>", "plain"], modality=["dna", "dna"]) == [None, -5.0]
    assert fn.failures[SCORER_ERROR] == 1 and fn.failures["no_tag"] == 1


def test_bad_config_values_name_the_key(model_dir):
    with pytest.raises(ConfigError, match="modalities"):
        MaskedLMScore(str(model_dir), modalities=["rna"])
    with pytest.raises(ConfigError, match="sources"):
        MaskedLMScore(str(model_dir), sources=["guess"])
    with pytest.raises(ConfigError, match="modality_tokens"):
        MaskedLMScore(str(model_dir), modality_tokens="bert")


def test_the_recipe_reward_loads_the_shipped_model_and_prefers_real_molecules():
    from pathlib import Path

    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(Path(__file__).resolve().parents[2] / "conf/reward/molgen/mlm.yaml")
    reward = instantiate(cfg)
    values, reasons, _ = reward.score(["<smiles>CC(C)O</smiles>", "<smiles>C)(=C((#</smiles>", "<protein>MKV"])
    assert reasons == [None, None, "no_tag"] and values[2] == -5.0
    # The shipped model (held-out SMILES masked-token accuracy 0.74) finds a molecule likelier than noise.
    assert values[0] > values[1]
