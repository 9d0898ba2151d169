"""Held-out conformer evaluation: test-set loading, per-molecule scores on hand-built completions
(exact references, garbage, another molecule), summaries, PoseBusters, seeded sampling, the
trainer's held-out evaluator."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("rdkit")
pytest.importorskip("transformers")

import torch  # noqa: E402
from rdkit import Chem  # noqa: E402

from elign.engine.errors import DataFormatError  # noqa: E402
from molgen_grpo.coverage import THRESHOLDS  # noqa: E402
from molgen_grpo.evaluate import (HeldoutEvaluator, load_test_molecules, molecule_seed, posebusters_pass,  # noqa: E402
                                  prompt_text, sample_completions, score_molecule, summarize)
from molgen_grpo.policy import Qwen3Policy  # noqa: E402
from molgen_grpo.text import encode  # noqa: E402
from molgen_grpo.tokenizer import ASSET_PATH, load_tokenizer  # noqa: E402

DATA = "package:molgen_grpo/data/qm9_conformers"
TINY = dict(init="random", hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=64, head_dim=8, max_position_embeddings=1024)
AT_05 = int(np.flatnonzero(np.isclose(THRESHOLDS, 0.5))[0])


@pytest.fixture(scope="module")
def molecules():
    return load_test_molecules(DATA, "test", max_molecules=3)


def conformer_text(mol: Chem.Mol) -> str:
    return f"[CONFORMER]{encode(Chem.RemoveHs(mol)).enriched}[/CONFORMER]"


def tiny_policy(**kwargs):
    torch.manual_seed(0)
    return Qwen3Policy(load_tokenizer(ASSET_PATH), TINY, stop_tokens=["[/CONFORMER]", "<|endoftext|>"], **kwargs)


def test_load_test_molecules_reads_distinct_molecules_in_file_order(molecules):
    assert len(molecules) == 3
    with open(load_test_molecules.__globals__["resolve_path"](DATA) + "/test.jsonl") as handle:
        order = list(dict.fromkeys(json.loads(line)["canonical_smiles"] for line in handle))
    assert [m.smiles for m in molecules] == order[:3]
    for mol in molecules:
        assert mol.references and all(r.GetNumConformers() == 1 for r in mol.references)
        assert Chem.MolToSmiles(Chem.RemoveHs(mol.references[0])) == mol.smiles
        assert mol.source.startswith("references/test/")


def test_load_test_molecules_errors_name_the_file_and_line(tmp_path):
    with pytest.raises(DataFormatError, match="smiles_to_pickle.json"):
        load_test_molecules(str(tmp_path))
    (tmp_path / "smiles_to_pickle.json").write_text("{}")
    (tmp_path / "test.jsonl").write_text('{"canonical_smiles": "CCO", "embedded_smiles": "x"}\n')
    with pytest.raises(DataFormatError, match=r"test.jsonl:1: CCO has no entry"):
        load_test_molecules(str(tmp_path))
    (tmp_path / "test.jsonl").write_text('{"canonical_smiles": "CCO", "embedded_smiles": "x"}\nnot json\n')
    with pytest.raises(DataFormatError, match=r"test.jsonl:2: not a JSON object"):
        load_test_molecules(str(tmp_path))


def test_score_molecule_counts_each_failure_kind(molecules):
    mol, other = molecules[0], molecules[1]
    completions = [conformer_text(mol.references[0]), "[CONFORMER][C]<1,2[/CONFORMER]",
                   conformer_text(other.references[0]), conformer_text(mol.references[-1])]
    result = score_molecule(mol, completions)
    assert (result["parsed"], result["graph_match"], result["n_gen"]) == (3, 2, 4)
    assert result["n_ref"] == len(mol.references)
    assert result["posebusters_pass"] is None
    # reference 0 is written back exactly (4 decimals truncated): RMSD below 1e-3 Å
    j, rmsd = result["nearest"][0]
    assert j == 0 and rmsd < 1e-3
    # two valid completions can cover at most two references; the two written ones are covered
    covered = sum(r is not None and r < 0.5 for _, r in result["nearest"])
    assert result["cov_r"][AT_05] == pytest.approx(covered / len(mol.references))
    assert covered >= min(2, len(mol.references))
    assert result["cov_p"][AT_05] == pytest.approx(2 / 4)  # the garbage and the other molecule count as misses
    assert result["valid"] == pytest.approx(2 / 4)


def test_summarize_rates_are_over_all_completions(molecules):
    mol = molecules[0]
    a = score_molecule(mol, [conformer_text(mol.references[0])] * 2, posebusters=True)
    b = score_molecule(molecules[1], ["nonsense"] * 6, posebusters=True)
    summary = summarize([a, b])
    assert summary["completions"] == 8
    assert summary["parse_rate"] == pytest.approx(2 / 8)
    assert summary["graph_match_rate"] == pytest.approx(2 / 8)
    assert summary["posebusters_pass_rate"] == pytest.approx(2 / 8)  # an RDKit MMFF conformer passes
    assert summary["molecules"] == 2 and summary["molecules_without_valid"] == 1
    assert summary["at_0.5"]["cov_r_mean"] == pytest.approx(a["cov_r"][AT_05] / 2)  # b covers nothing
    assert summary["at_0.5"]["mat_r_mean"] == pytest.approx(a["mat_r"])  # b has no valid conformer
    assert len(summary["cov_r_mean"]) == len(summary["thresholds"]) == len(THRESHOLDS)
    assert summarize([a])["posebusters_pass_rate"] == 1.0
    assert summarize([score_molecule(mol, ["x"])])["posebusters_pass_rate"] is None


def test_posebusters_rejects_a_squashed_conformer(molecules):
    ref = Chem.RemoveHs(molecules[0].references[0])
    assert posebusters_pass(ref)
    squashed = Chem.Mol(ref)
    conf = squashed.GetConformer()
    for i in range(squashed.GetNumAtoms()):
        p = conf.GetAtomPosition(i)
        conf.SetAtomPosition(i, (p.x * 0.6, p.y * 0.6, p.z * 0.6))  # every bond 40 % too short
    assert not posebusters_pass(squashed)


def test_sampling_is_seeded_per_molecule_not_per_position(molecules):
    policy = tiny_policy(max_new_tokens=12)
    both = sample_completions(policy, molecules[:2], samples_per_reference=1, seed=3)
    alone = sample_completions(policy, molecules[1:2], samples_per_reference=1, seed=3)
    assert [len(c) for c in both] == [len(m.references) for m in molecules[:2]]
    assert alone[0] == both[1]
    assert sample_completions(policy, molecules[1:2], samples_per_reference=1, seed=4)[0] != both[1]
    assert molecule_seed(3, "CCO") != molecule_seed(3, "CCN") != molecule_seed(4, "CCO")


def test_constrained_sampling_always_parses_with_the_prompt_graph(molecules):
    policy = tiny_policy(max_new_tokens=400, constrained=True)
    texts = sample_completions(policy, molecules[:1], samples_per_reference=1)[0]
    result = score_molecule(molecules[0], texts)
    assert result["parsed"] == result["graph_match"] == len(texts)
    assert all(np.isfinite(r) for _, r in result["nearest"])


def test_heldout_evaluator_reports_loss_and_rates_and_keeps_the_rng():
    policy = tiny_policy(max_new_tokens=16)
    evaluator = HeldoutEvaluator(DATA, "valid", seq_len=512, batch_size=4, max_rows=6, num_molecules=2,
                                 samples_per_molecule=2)
    torch.manual_seed(7)
    before = torch.random.get_rng_state()
    first = evaluator(policy)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert set(first) == {"loss", "parse_rate", "graph_match_rate", "mat_r_mean"}
    vocab = len(policy.tokenizer)
    assert 0.5 * np.log(vocab) < first["loss"] < 2 * np.log(vocab)  # a random model: about ln(vocab)
    assert first["parse_rate"] == 0.0  # 16 tokens cannot hold a conformer
    assert evaluator(policy) == pytest.approx(first, nan_ok=True)  # fixed rows and seed
    assert policy.module.training  # evaluation leaves the mode as it found it
    assert prompt_text("CCO") == "[SMILES]CCO[/SMILES]"
