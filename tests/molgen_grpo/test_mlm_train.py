"""The tiny masked LM's corpus and training script: real PDB chains (held out by entry), synthetic coding DNA that
translates back, and a short training run whose folder loads as a masked LM and reports held-out accuracy."""

import json
import random
from pathlib import Path

import pytest
import torch

from molgen_grpo.mlm_corpus import build_corpus, library_structures, protein_sequences, reverse_translate
from molgen_grpo.mlm_model import load_masked_lm
from molgen_grpo.mlm_scorer import MaskedLMScorer
from molgen_grpo.mlm_model import MODALITY_TOKENS, build_char_tokenizer
from molgen_grpo.mlm_train import collate, main

SMILES = ["CCO", "c1ccccc1", "CC(=O)O", "CCN", "OC1CC1", "C#N", "CC(C)O", "O=CO", "CCCC", "CN(C)C"] * 5


@pytest.fixture(scope="module")
def structures():
    files = library_structures()
    if not files:
        pytest.skip("no library-shipped PDB files (posebusters) installed")
    return files


def test_reverse_translation_codes_for_the_protein():
    from biotite.sequence import NucleotideSequence

    protein = "MKTAYIAKQRQISFVKSHFSRQ"
    dna = reverse_translate(protein, random.Random(0))
    assert len(dna) == 3 * len(protein) + 3 and set(dna) <= set("ACGT")
    assert str(NucleotideSequence(dna).translate(complete=True)) == protein + "*"


def test_corpus_holds_out_whole_entries_and_dedupes_chains(structures, tmp_path):
    chains = protein_sequences(structures)
    names = [n for n, _ in chains]
    assert len(names) == len(set(names)) and all(len(s) >= 20 for _, s in chains)
    (tmp_path / "smiles.txt").write_text("\n".join(SMILES))
    entry = names[0].split(":")[0]
    corpus = build_corpus(tmp_path / "smiles.txt", structures, max_smiles=40, heldout_entries=[entry])
    assert corpus.sources["protein_heldout"] and all(n.startswith(entry) for n in corpus.sources["protein_heldout"])
    assert not any(n.startswith(entry + ":") for n in corpus.sources["protein_train"])
    assert len(corpus.heldout["smiles"]) == 2 and len(corpus.train["smiles"]) == 38  # 5 % held out
    assert len(corpus.train["dna"]) == len(corpus.train["protein"])


def test_training_writes_a_loadable_model_and_its_report(structures, tmp_path):
    (tmp_path / "smiles.txt").write_text("\n".join(SMILES))
    out = tmp_path / "mlm"
    report = main(["--out", str(out), "--smiles", str(tmp_path / "smiles.txt"), "--pdb", "--steps", "20",
                   "--batch-size", "8", "--hidden-size", "32", "--layers", "1", "--max-chars", "40",
                   "--threads", "1"])
    on_disk = json.loads((out / "training.json").read_text())
    assert on_disk["steps"] == 20 and set(on_disk["heldout_masked_accuracy"]) == {"smiles", "protein", "dna"}
    for acc in on_disk["heldout_masked_accuracy"].values():
        assert 0.0 <= acc["accuracy"] <= 1.0 and acc["masked_tokens"] > 0
    assert report["parameters"] == on_disk["parameters"] > 0
    model, tokenizer = load_masked_lm(str(out))
    scores = MaskedLMScorer(model, tokenizer, mode="masked_pll", modality_tokens={"smiles": "<cls_smiles>"}).score(
        ["CCO", "c1ccccc1"], "smiles")
    assert scores.shape == (2,) and bool((scores < 0).all())


def test_the_modality_token_and_eos_are_never_masked():
    from transformers import DataCollatorForLanguageModeling

    tokenizer = build_char_tokenizer(["CCO", "ACGT"])
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.5)
    torch.manual_seed(0)
    special = torch.tensor(tokenizer.all_special_ids)
    for _ in range(20):
        batch = collate(tokenizer, collator, [MODALITY_TOKENS["smiles"] + "CCOCCO", MODALITY_TOKENS["dna"] + "ACGT"])
        labelled = batch["labels"] != -100
        assert labelled.any() and not torch.isin(batch["labels"][labelled], special).any()
        assert (batch["input_ids"][:, 0] == torch.tensor([tokenizer.convert_tokens_to_ids(MODALITY_TOKENS[m])
                                                          for m in ("smiles", "dna")])).all()
