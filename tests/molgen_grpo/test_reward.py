"""Conformer rewards v3 and legacy on the shipped QM9 references: gates in order and counted,
PoseBusters modes, RMSD of references with added noise against an independent Kabsch, prompt-id
groups, missing references, the process pool, and a golden batch."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("rdkit")
pytest.importorskip("posebusters")

import torch  # noqa: E402
from rdkit import Chem  # noqa: E402
from rdkit.Geometry import Point3D  # noqa: E402

from elign.engine.errors import ConfigError  # noqa: E402
from elign.engine.rollout import Rollout  # noqa: E402
from molgen_grpo.posebusters_gate import PoseBustersGate, gate_config  # noqa: E402
from molgen_grpo.references import ReferenceStore, prompt_smiles  # noqa: E402
from molgen_grpo.reward import ConformerReward, LegacyConformerReward  # noqa: E402
from molgen_grpo.reward_math import soft_coverage, soft_hits  # noqa: E402
from molgen_grpo.text import encode  # noqa: E402

DATA = "package:molgen_grpo/data/qm9_conformers"


@pytest.fixture(scope="module")
def store():
    return ReferenceStore(DATA)


@pytest.fixture(scope="module")
def molecule(store):
    """A molecule with at least three references, and another molecule."""
    smiles = [s for s in store.mapping if len(store.get(s)) >= 3]
    return smiles[0], smiles[1]


def text_of(mol: Chem.Mol) -> str:
    return f"[CONFORMER]{encode(Chem.RemoveHs(mol)).enriched}[/CONFORMER]"


def moved(mol: Chem.Mol, delta: np.ndarray) -> Chem.Mol:
    out = Chem.Mol(mol)
    conf = out.GetConformer()
    for i, (x, y, z) in enumerate(conf.GetPositions() + delta):
        conf.SetAtomPosition(i, Point3D(float(x), float(y), float(z)))
    return out


def kabsch_rmsd(a: np.ndarray, b: np.ndarray) -> float:
    """RMSD of ``a`` onto ``b`` after the optimal rotation and translation (same atom order)."""
    a, b = a - a.mean(0), b - b.mean(0)
    u, _, vt = np.linalg.svd(a.T @ b)
    sign = np.sign(np.linalg.det(u @ vt))
    rot = u @ np.diag([1.0, 1.0, sign]) @ vt
    return float(np.sqrt(((a @ rot - b) ** 2).sum(1).mean()))


def rollout(prompts: list[str], groups: list[int], completions: list[str]) -> Rollout:
    b = len(completions)
    return Rollout(group_ids=torch.tensor(groups), logp_old=torch.zeros(b, 2), step_mask=torch.ones(b, 2, dtype=torch.bool),
                   payload={}, info={"completions": completions, "prompts": prompts})


def prompt(smiles: str) -> str:
    return f"[SMILES]{smiles}[/SMILES]"


def test_prompt_smiles_and_store(store, molecule):
    assert prompt_smiles("[SMILES]CCO[/SMILES][CONFORMER]") == "CCO"
    assert prompt_smiles("no tags") is None
    refs = store.get(molecule[0])
    assert refs is store.get(molecule[0])  # cached
    assert all(a.GetAtomicNum() > 1 for m in refs for a in m.GetAtoms())
    assert store.get("not-a-molecule") is None


def test_references_with_added_noise_have_the_rmsd_of_an_independent_kabsch(store, molecule):
    smiles, _ = molecule
    refs = store.get(smiles)
    rng = np.random.default_rng(0)
    noisy, expected = [], []
    for scale in (0.05, 0.3, 1.5):
        delta = rng.normal(scale=scale, size=(refs[0].GetNumAtoms(), 3))
        mol = moved(refs[0], delta)
        noisy.append(text_of(mol))
        expected.append([kabsch_rmsd(mol.GetConformer().GetPositions(), r.GetConformer().GetPositions()) for r in refs])
    reward = ConformerReward(DATA, posebusters="off")
    score = reward.score_group(smiles, noisy)
    # the text keeps 4 decimals, so coordinates move by < 1e-4 Å
    np.testing.assert_allclose(score.distances, np.array(expected), atol=2e-4)
    assert score.valid.all()
    d = score.distances
    hits = soft_hits(d, reward.delta, reward.rho)
    np.testing.assert_allclose(score.soft_coverage, soft_coverage(hits))
    np.testing.assert_allclose(score.terms["quality"], np.exp(-d.min(1) / reward.sigma))
    assert d[0].min() < 0.2 and d[2].min() > 0.75  # a near copy covers its reference, a far one nothing


def test_gates_apply_in_order_and_every_failure_is_counted(store, molecule):
    smiles, other = molecule
    ref = store.get(smiles)[0]
    squashed = Chem.Mol(ref)
    conf = squashed.GetConformer()
    for i, p in enumerate(conf.GetPositions() * 0.4):
        conf.SetAtomPosition(i, Point3D(*map(float, p)))
    completions = [text_of(ref), "[CONFORMER]C<0,0>[/CONFORMER]", text_of(store.get(other)[0]), text_of(squashed),
                   text_of(ref).removesuffix("[/CONFORMER]")]  # an unclosed block fails decoding
    reward = ConformerReward(DATA, posebusters="geometry", r_floor=-0.7)
    out = reward(rollout([prompt(smiles)] * 5, [0] * 5, completions))
    total = out.channels["conformer"].numpy()
    assert total[0] > 0 and (total[1:] == -0.7).all()
    assert out.failures == {"no_reference": 0, "decode": 2, "graph": 1, "posebusters": 1, "rmsd": 0}
    assert out.metrics["gate_decode_frac"] == pytest.approx(3 / 5)
    assert out.metrics["valid_frac"] == pytest.approx(1 / 5)
    assert out.metrics["posebusters_checked"] == 2  # only the completions that passed the graph gate
    off = ConformerReward(DATA, posebusters="off")(rollout([prompt(smiles)] * 5, [0] * 5, completions))
    assert off.failures["posebusters"] == 0 and off.channels["conformer"][3] > 0  # squashed but aligned


def test_posebusters_off_never_runs_the_runner_and_errors_fail_the_rollout(store, molecule, monkeypatch):
    smiles, _ = molecule
    completions = [text_of(store.get(smiles)[0])]

    def broken(self):
        raise RuntimeError("PoseBusters exploded")

    monkeypatch.setattr(PoseBustersGate, "_buster", broken)
    assert ConformerReward(DATA, posebusters="off")(rollout([prompt(smiles)], [0], completions)).channels["conformer"][0] > 0
    reward = ConformerReward(DATA, posebusters="basic")
    out = reward(rollout([prompt(smiles)], [0], completions))
    assert out.channels["conformer"][0] == reward.r_floor
    assert out.failures["posebusters"] == 1 and out.metrics["posebusters_errors"] == 1


def test_posebusters_verdicts_are_cached_per_molecule(store, molecule):
    smiles, _ = molecule
    ref = store.get(smiles)[0]
    gate = PoseBustersGate("basic")
    mols = [Chem.MolFromMolBlock(Chem.MolToMolBlock(ref))] * 3
    passed, error, stats = gate(mols)
    assert passed.all() and not error.any() and stats.checked == 1  # three copies, one check
    passed, _, stats = gate(mols)
    assert passed.all() and stats.checked == 0 and stats.cached == 3


def test_gate_configs_cut_posebusters_mol_config():
    basic = [m["function"] for m in gate_config("basic")["modules"]]
    assert basic == ["loading", "rdkit_sanity", "inchi_convertible", "atoms_connected"]
    assert [m["function"] for m in gate_config("geometry")["modules"]][-1] == "distance_geometry"
    full = gate_config("full", energy_threads=1)["modules"]
    energy = [m for m in full if m["function"] == "energy_ratio"]
    assert len(energy) == 1 and energy[0]["parameters"]["num_threads"] == 1  # mol.yml lists it twice
    assert energy[0]["parameters"]["threshold_energy_ratio"] == 100.0
    assert sum(m["function"] == "flatness" for m in full) == 3
    with pytest.raises(ConfigError, match="posebusters"):
        PoseBustersGate("strict")


def test_groups_are_prompt_ids_not_prompt_strings(store, molecule):
    smiles, _ = molecule
    copy = text_of(store.get(smiles)[0])
    reward = ConformerReward(DATA, posebusters="off")
    apart = reward(rollout([prompt(smiles)] * 2, [0, 1], [copy, copy])).channels["conformer"]
    together = reward(rollout([prompt(smiles)] * 2, [0, 0], [copy, copy])).channels["conformer"]
    assert apart[0] == apart[1] and together[0] == together[1]
    assert together[0] < apart[0]  # duplicates in one group share the reference's coverage


def test_a_molecule_without_references_is_a_counted_failure(molecule, store):
    out = ConformerReward(DATA, posebusters="off")(
        rollout([prompt("C1CC1CCCCCCCCl"), prompt(molecule[0])], [0, 1], ["x", text_of(store.get(molecule[0])[0])]))
    assert np.isnan(float(out.channels["conformer"][0])) and out.channels["conformer"][1] > 0
    assert out.failures["no_reference"] == 1


def test_the_process_pool_gives_the_serial_scores(store, molecule):
    smiles, other = molecule
    rng = np.random.default_rng(1)
    completions = [text_of(moved(r, rng.normal(scale=0.2, size=(r.GetNumAtoms(), 3)))) for r in store.get(smiles)[:3]]
    completions += [text_of(store.get(other)[0])]
    batch = rollout([prompt(smiles)] * 3 + [prompt(other)], [0, 0, 0, 1], completions)
    serial = ConformerReward(DATA, posebusters="off", diversity=True)(batch)
    pooled = ConformerReward(DATA, posebusters="off", num_workers=2)
    try:
        out = pooled(batch)
    finally:
        pooled.close()
    torch.testing.assert_close(out.channels["conformer"], serial.channels["conformer"])
    assert np.isfinite(serial.metrics["diversity_rmsd_median"])


def test_golden_batch(store, molecule):
    """Fixed completions (references with seeded noise) give fixed rewards: a change in the maths or
    the RDKit alignment shows here."""
    smiles, _ = molecule
    rng = np.random.default_rng(7)
    refs = store.get(smiles)
    completions = [text_of(moved(refs[i % len(refs)], rng.normal(scale=s, size=(refs[0].GetNumAtoms(), 3))))
                   for i, s in enumerate((0.02, 0.1, 0.3, 0.6))]
    out = ConformerReward(DATA, posebusters="off")(rollout([prompt(smiles)] * 4, [0] * 4, completions))
    score = ConformerReward(DATA, posebusters="off").score_group(smiles, completions)
    # every term recomputed from the matrix with the formulas written out
    d, delta, rho = score.distances, 0.75, 0.07
    h = 1 / (1 + np.exp(-(delta - d) / rho))
    t, w = np.polynomial.legendre.leggauss(8)
    t = (t + 1) / 2
    phi = np.zeros_like(h)
    for i in range(4):
        others = np.delete(h, i, axis=0)
        phi[i] = h[i] * sum(wk / 2 * np.prod(1 - tk * others, axis=0) for tk, wk in zip(t, w))
    smcov = (phi * (1 + 0.2 * np.clip(1 - d / delta, 0, 1))).mean(1) + 0.08 / (1 + np.exp(-(delta - d.min(1)) / rho))
    np.testing.assert_allclose(out.channels["conformer"].numpy(), 5.0 * smcov, rtol=1e-9)
    np.testing.assert_allclose(d.min(1), [0.02864, 0.10112, 0.36119, 0.84561], atol=1e-4)


def test_legacy_reward(store, molecule):
    smiles, other = molecule
    completions = [text_of(store.get(smiles)[0]), text_of(store.get(other)[0]), "no conformer"]
    out = LegacyConformerReward(DATA)(rollout([prompt(smiles)] * 3, [0, 0, 0], completions))
    total = out.channels["conformer"].numpy()
    assert total[0] == pytest.approx(1.0, abs=1e-3)  # RMSD ~0 and the exact SMILES
    other_plain = Chem.MolToSmiles(Chem.RemoveHs(store.get(other)[0]))
    assert 0 <= total[1] <= 0.15 and total[2] == 0
    assert out.failures["graph"] == 1 and out.failures["decode"] == 1
    assert other_plain != smiles
