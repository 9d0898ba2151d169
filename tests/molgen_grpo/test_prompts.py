"""GRPO prompts from a conformer data folder, JSONL-backed references, and the coverage evaluator."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("rdkit")

import torch  # noqa: E402

from elign.engine.errors import ConfigError, DataFormatError  # noqa: E402
from elign.engine.rollout import Rollout  # noqa: E402
from molgen_grpo.evaluate import CoverageEvaluator  # noqa: E402
from molgen_grpo.prompts import ConformerPrompts  # noqa: E402
from molgen_grpo.references import ReferenceStore, prompt_smiles, split_smiles  # noqa: E402
from molgen_grpo.text import decode, encode  # noqa: E402
from molgen_grpo.tokenizer import resolve_path  # noqa: E402

DATA = "package:molgen_grpo/data/qm9_conformers"


def test_prompts_are_seeded_draws_with_one_group_per_prompt():
    source = ConformerPrompts(DATA, batch_size=12, group_size=3, reference_splits=["train"])
    torch.manual_seed(5)
    first = next(source)
    torch.manual_seed(5)
    again = next(source)
    assert first == again and len(first) == 4  # the trainer reseeds: a resumed run draws the same prompts
    assert len({p.prompt_id for p in first}) == 4  # a molecule drawn twice is two groups
    assert all(prompt_smiles(p.text) in source.smiles for p in first)
    assert source.smiles == list(split_smiles(DATA, "train"))


def test_prompts_check_their_arguments_and_references():
    with pytest.raises(ConfigError, match="batch_size"):
        ConformerPrompts(DATA, batch_size=10, group_size=4, reference_splits=["train"])
    with pytest.raises(DataFormatError, match="have no references"):
        ConformerPrompts(DATA, batch_size=8, group_size=4)  # train molecules are not pickled


def test_jsonl_references_are_the_molecules_lines_in_file_order():
    store = ReferenceStore(DATA, max_references=3, jsonl_splits=["train"])
    root = resolve_path(DATA)
    lines = [json.loads(x) for x in open(f"{root}/train.jsonl")]
    smiles = lines[0]["canonical_smiles"]
    expected = [r["embedded_smiles"] for r in lines if r["canonical_smiles"] == smiles][:3]
    refs = store.get(smiles)
    assert len(refs) == len(expected)
    for ref, text in zip(refs, expected):
        np.testing.assert_allclose(ref.GetConformer().GetPositions(), decode(text).GetConformer().GetPositions())
    assert smiles in store and smiles not in ReferenceStore(DATA)


def test_a_bad_jsonl_line_is_named(tmp_path):
    root = resolve_path(DATA)
    for name in ("smiles_to_pickle.json",):
        (tmp_path / name).write_text(open(f"{root}/{name}").read())
    (tmp_path / "train.jsonl").write_text('{"canonical_smiles": "CCO", "embedded_smiles": "[C]<0,0,0>"}\nnot json\n')
    with pytest.raises(DataFormatError, match=r"train.jsonl.*2"):
        ReferenceStore(str(tmp_path), jsonl_splits=["train"])


def test_coverage_evaluator_scores_held_out_molecules():
    evaluator = CoverageEvaluator(DATA, "valid", num_molecules=2, samples_per_reference=1)
    class CopySampler:  # a "policy" whose completions are the molecule's own references
        def rollout(self, prompts, k):
            mol = next(m for m in evaluator.molecules if prompt_smiles(prompts[0].text) == m.smiles)
            texts = [f"[CONFORMER]{encode(mol.references[i % len(mol.references)]).enriched}[/CONFORMER]"
                     for i in range(k)]
            return Rollout(group_ids=torch.zeros(k, dtype=torch.long), logp_old=torch.zeros(k, 1),
                           step_mask=torch.ones(k, 1, dtype=torch.bool), payload={}, info={"completions": texts})

    out = evaluator(CopySampler())
    assert out["parse_rate"] == 1.0 and out["cov_r_0.5"] == 1.0 and out["mat_r_mean"] < 1e-3
    assert out["molecules_without_valid"] == 0
