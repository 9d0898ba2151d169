"""The masked-LM recipe's sequence writer: its character tokenizer, the SFT rows and batches (labels hand-checked),
and the training script writing a folder that the recipe's policy config loads."""

import json

import pytest
import torch

from molgen_grpo.mlm_prompts import INSTRUCTIONS
from molgen_grpo.mlm_writer import answer, build_writer_tokenizer, main, sft_batch, sft_rows
from molgen_grpo.modality import MODALITIES, check_sequence, parse_completion
from molgen_grpo.tokenizer import EOS_TOKEN, load_tokenizer


def test_tokenizer_is_one_token_per_character_and_round_trips():
    tokenizer = build_writer_tokenizer()
    text = INSTRUCTIONS["smiles"] + "<smiles>C[C@@H](O)c1ccccc1</smiles>\n ~"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) == len(text) and tokenizer.decode(ids) == text
    assert tokenizer.eos_token == tokenizer.pad_token == EOS_TOKEN and tokenizer.eos_token_id == 0
    assert tokenizer.decode(ids + [0], skip_special_tokens=True) == text


def test_sft_rows_take_turns_and_every_answer_is_tagged_and_valid():
    rows = sft_rows(["CCO", "c1ccccc1"], 30, seed=0)
    assert [r["modality"] for r in rows[:3]] == list(MODALITIES) and len(rows) == 30
    for row in rows:
        parsed = parse_completion(row["completion"], None, ("tags",))
        assert row["prompt"] == INSTRUCTIONS[row["modality"]] and parsed.modality == row["modality"]
        assert check_sequence(parsed.sequence, parsed.modality) is None
    assert sft_rows(["CCO"], 9, seed=1) == sft_rows(["CCO"], 9, seed=1)


def test_sft_batch_targets_only_the_answer_and_its_end_token():
    tokenizer = build_writer_tokenizer()
    rows = [{"prompt": "ab", "completion": "<c>"}, {"prompt": "x", "completion": "y"}]
    batch = sft_batch(tokenizer, rows)
    ids = {c: tokenizer.convert_tokens_to_ids(c) for c in "abxy<c>"}
    # Row 0: a b < c > eos; position t's label is token t + 1, the instruction's own tokens are not targets.
    assert batch["input_ids"][0].tolist() == [ids["a"], ids["b"], ids["<"], ids["c"], ids[">"], 0]
    assert batch["labels"][0].tolist() == [-100, ids["<"], ids["c"], ids[">"], 0, -100]
    # Row 1 is right padded with eos, padding masked out and never a target.
    assert batch["input_ids"][1].tolist() == [ids["x"], ids["y"], 0, 0, 0, 0]
    assert batch["labels"][1].tolist() == [ids["y"], 0, -100, -100, -100, -100]
    assert batch["attention_mask"].tolist() == [[1] * 6, [1, 1, 1, 0, 0, 0]]


def test_script_writes_a_folder_the_recipe_policy_loads(tmp_path):
    smiles = tmp_path / "smiles.txt"
    smiles.write_text("CCO\nc1ccccc1\nCC(=O)O\n")
    out = tmp_path / "writer"
    report = main(["--out", str(out), "--smiles", str(smiles), "--rows", "30", "--steps", "3", "--batch-size", "4",
                   "--hidden-size", "32", "--layers", "1", "--threads", "1"])
    saved = json.loads((out / "training.json").read_text())
    assert saved["steps"] == 3 and saved["pairs"] == 30 and saved["command"].endswith("--threads 1")
    assert set(saved["heldout_test_split"]) == {"tagged_frac", "valid_frac", "on_modality_frac"}
    assert report["parameters"] == saved["parameters"] > 0
    from molgen_grpo.policy import Prompt, Qwen3Policy

    tokenizer = load_tokenizer(str(out), tags=[])
    assert len(tokenizer) == len(build_writer_tokenizer())  # no enriched-SMILES tags added
    policy = Qwen3Policy(tokenizer, {"init": "pretrained", "path": str(out)}, stop_tokens=[EOS_TOKEN], max_new_tokens=8)
    torch.manual_seed(0)
    rollout = policy.rollout([Prompt(0, INSTRUCTIONS["dna"], "dna")], 2)
    assert len(rollout.info["completions"]) == 2 and rollout.info["modalities"] == ["dna", "dna"]


def test_answer_tags_are_the_ones_the_reward_reads():
    for modality in MODALITIES:
        assert parse_completion(answer(modality, "CCO"), None, ("tags",)).modality == modality


def test_load_tokenizer_rejects_bad_tags(tmp_path):
    build_writer_tokenizer().save_pretrained(tmp_path)
    from elign.engine.errors import ConfigError

    with pytest.raises(ConfigError, match="tags"):
        load_tokenizer(str(tmp_path), tags="<smiles>")
    assert len(load_tokenizer(str(tmp_path))) == len(build_writer_tokenizer()) + 4  # the default adds the four


def test_the_shipped_writer_answers_held_out_prompts_with_tagged_valid_sequences():
    """The recipe's policy config loads the shipped weights, and they write what the reward reads (training.json
    records 80 % valid on the test split; a fixed seed makes this subset's figure exact, not a draw)."""
    from pathlib import Path

    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from molgen_grpo.mlm_eval import answer_rates, sample_answers
    from molgen_grpo.mlm_prompts import read_rows

    root = Path(__file__).resolve().parents[2]
    policy = instantiate(OmegaConf.load(root / "conf/model/molgen/qwen3_mlm_writer.yaml"), _convert_="all")
    rows = read_rows("package:molgen_grpo/data/mlm_prompts/test.json")
    rows = [next(r for r in rows if r["modality"] == m) for m in MODALITIES]
    answers = sample_answers(policy, rows, 4, seed=0)
    rates = answer_rates(answers, [r["modality"] for r in rows for _ in range(4)])
    assert rates["tagged_frac"] >= 0.75 and rates["valid_frac"] >= 0.5, (rates, answers)
