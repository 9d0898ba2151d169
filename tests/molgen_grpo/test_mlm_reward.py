"""Masked-LM rewards: tags and penalties with counted reasons, scorer failures as NaN (engine) / None (TRL),
the TRL signature and name, and models loaded from a save_pretrained folder."""

import numpy as np
import pytest
import torch

from elign.engine.errors import ConfigError
from elign.engine.rollout import Rollout
from molgen_grpo.mlm_model import MODALITY_TOKENS, build_char_tokenizer, build_tiny_mlm, load_masked_lm
from molgen_grpo.mlm_reward import SCORER_ERROR, MaskedLMReward, MaskedLMRewardFunction, MaskedLMScore

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
    rollout = Rollout(group_ids=torch.zeros(len(COMPLETIONS), dtype=torch.long), logp_old=torch.zeros(5, 1),
                      step_mask=torch.ones(5, 1, dtype=torch.bool),
                      info={"completions": COMPLETIONS, "prompts": ["p"] * 5, "modalities": ["smiles"] * 5})
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
    scored = values[[0, 4]].numpy()
    assert out.metrics["mlm_below_penalty_frac"] == pytest.approx(float(np.mean(scored < -5.0)))
    reward.score.penalty = float(scored.max()) + 1.0  # a penalty above every score: all of them are below it
    assert reward(rollout).metrics["mlm_below_penalty_frac"] == 1.0


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
    texts = ["<smiles>CC(C)O</smiles>", "<smiles>C)(=C((#</smiles>", "<protein>MKV"]
    values, reasons, _ = instantiate(cfg).score(texts)
    assert reasons == [None, "invalid_smiles", "no_tag"] and values[1] == values[2] == -5.0
    # Scored anyway (lobster's way), the shipped model (held-out SMILES masked-token accuracy 0.74) still finds
    # the molecule likelier than the noise.
    cfg.check_sequences = False
    values, reasons, _ = instantiate(cfg).score(texts)
    assert reasons == [None, None, "no_tag"] and values[0] > values[1]


def test_masked_lm_and_conformer_rewards_compose_as_weighted_channels():
    """The composed reward of a run that sums the masked-LM reward with the conformer reward (issue 18 §6)."""
    import json
    from pathlib import Path

    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from elign.engine.strategies.grpo import GRPOStrategy

    conf = Path(__file__).resolve().parents[2] / "conf/reward"
    composed = OmegaConf.load(conf / "composed.yaml")
    composed.rewards = {"conformer": OmegaConf.load(conf / "molgen/conformer_v3.yaml"),
                        "mlm": OmegaConf.load(conf / "molgen/mlm.yaml")}
    reward = instantiate(composed)
    line = (Path(__file__).resolve().parents[2] / "molgen_grpo/data/qm9_conformers/train.jsonl").read_text()
    row = json.loads(line.splitlines()[0])
    smiles, embedded = row["canonical_smiles"], row["embedded_smiles"]
    prompt = f"[SMILES]{smiles}[/SMILES]"
    completions = [f"[CONFORMER]{embedded}[/CONFORMER] <smiles>{smiles}</smiles>", "[CONFORMER]broken"]
    rollout = Rollout(group_ids=torch.zeros(2, dtype=torch.long), logp_old=torch.zeros(2, 1),
                      step_mask=torch.ones(2, 1, dtype=torch.bool),
                      info={"completions": completions, "prompts": [prompt, prompt], "modalities": ["smiles"] * 2})
    out = reward(rollout)
    assert set(out.channels) == {"conformer", "mlm"}
    assert out.failures.get("mlm_no_tag") == 1 and out.channels["mlm"][1] == -5.0
    assert any(k.startswith("conformer_") for k in out.failures) and "mlm_mlm_scored_frac" in out.metrics
    # The strategy weighs the two channels into one total, as TRL's reward_weights do.
    strategy = GRPOStrategy(reward_weights={"conformer": 1.0, "mlm": 0.1}, default_weight=0.0)
    assert strategy.reward_weights(list(out.channels)) == {"conformer": 1.0, "mlm": 0.1}


def test_check_sequences_penalises_tagged_sequences_invalid_for_their_modality(model_dir):
    texts = ["<smiles>C1CC</smiles>", "<protein>MKVZ</protein>", "<dna>ACGU</dna>", "<smiles>CCO</smiles>"]
    values, reasons, _ = MaskedLMScore(str(model_dir), penalty_for_invalid=-5.0)(texts)
    assert reasons == ["invalid_smiles", "invalid_protein", "invalid_dna", None]
    assert list(values[:3]) == [-5.0] * 3 and values[3] != -5.0
    # lobster's behaviour, on request: whatever sits in the tags is scored.
    values, reasons, _ = MaskedLMScore(str(model_dir), check_sequences=False)(texts)
    assert reasons == [None] * 4 and np.isfinite(values).all()
    with pytest.raises(ConfigError, match="check_sequences"):
        MaskedLMScore(str(model_dir), check_sequences="yes")


def test_match_metadata_penalises_answers_in_another_modality(model_dir):
    texts = ["<dna>ACGTAC</dna>", "<protein>MKVAC</protein>", "<dna>ACGTAC</dna>"]
    metadata = ["protein", "protein", None]  # no metadata: nothing to match against
    values, reasons, _ = MaskedLMScore(str(model_dir), match_metadata=True, penalty_for_invalid=-5.0)(texts, metadata)
    assert reasons == ["wrong_modality", None, None] and values[0] == -5.0 and values[2] != -5.0
    _, reasons, _ = MaskedLMScore(str(model_dir))(texts, metadata)  # lobster's behaviour: the tag decides alone
    assert reasons == [None, None, None]
    with pytest.raises(ConfigError, match="match_metadata"):
        MaskedLMScore(str(model_dir), match_metadata=1)


def test_an_esm2_style_protein_model_from_a_local_folder(tmp_path):
    """Not only ModernBERT: an ESM-2 layout (EsmForMaskedLM, EsmTokenizer with its own <cls> / <eos>) written in
    the Hub's file format scores protein answers with modality_tokens none."""
    from transformers import EsmConfig, EsmForMaskedLM, EsmTokenizer

    vocab = ["<cls>", "<pad>", "<eos>", "<unk>", *"LAGVSERTIDPKQNFYMHWCXBUZO.-", "<null_1>", "<mask>"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = EsmTokenizer(str(tmp_path / "vocab.txt"))
    torch.manual_seed(0)
    model = EsmForMaskedLM(EsmConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=64, pad_token_id=1,
                                     mask_token_id=len(vocab) - 1, position_embedding_type="rotary"))
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    score = MaskedLMScore(str(tmp_path), modalities=["protein"], modality_tokens="none")
    values, reasons, _ = score(["<protein>MKVLA</protein>", "<dna>ACGT</dna>"])
    assert reasons == [None, "unsupported_modality"] and np.isfinite(values[0])
    # unmasked_mean by hand: mean log-prob of every token of "<cls> M K V L A <eos>".
    ids = tokenizer("MKVLA", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model.eval()(input_ids=ids).logits[0], -1)  # eval: no dropout
    assert values[0] == pytest.approx(float(logp.gather(1, ids[0][:, None]).mean()), abs=1e-5)


def test_empty_batches_give_empty_rewards(model_dir):
    fn = MaskedLMRewardFunction(path=str(model_dir))
    assert fn([], []) == [] and not fn.failures
    values, reasons, modalities = MaskedLMScore(str(model_dir))([])
    assert values.shape == (0,) and reasons == [] and modalities == []
