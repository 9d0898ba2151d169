"""ForceFieldReward and ChemistryFilter on real RDKit conformers (xTB in process)."""

import math

import numpy as np
import pytest
import torch
from rdkit import Chem
from rdkit.Chem import AllChem

from elign.edm.filter import ChemistryFilter
from elign.edm.force_reward import ForceFieldReward
from elign.edm.shaping import PotentialShaping, RewardScheduler
from elign.engine.bookkeeping import RewardBook
from elign.engine.errors import ConfigError
from elign.engine.rollout import Rollout
from elign.engine.strategies.fed_grpo import FedGRPOStrategy
from elign.forcefield.dummy import DummyForceField
from elign.forcefield.xtb import XTBForceField

TYPE_INDEX = {1: 0, 6: 1, 7: 2, 8: 3, 9: 4}


def conformer(smiles: str, seed: int = 7):
    mol = Chem.AddHs(Chem.MolFromSmiles(smiles))
    AllChem.EmbedMolecule(mol, randomSeed=seed)
    AllChem.MMFFOptimizeMolecule(mol)
    return mol.GetConformer().GetPositions(), [a.GetAtomicNum() for a in mol.GetAtoms()]


def make_rollout(molecules, num_steps: int = 4, z0_pred: bool = False) -> Rollout:
    n = max(len(z) for _, z in molecules)
    b = len(molecules)
    pos = torch.zeros(b, n, 3, dtype=torch.float64)
    types = torch.zeros(b, n, dtype=torch.long)
    mask = torch.zeros(b, n, dtype=torch.bool)
    for i, (p, z) in enumerate(molecules):
        pos[i, : len(z)] = torch.as_tensor(p)
        types[i, : len(z)] = torch.tensor([TYPE_INDEX[a] for a in z])
        mask[i, : len(z)] = True
    payload = {"positions": pos.float(), "atom_types": types, "node_mask": mask}
    if z0_pred:
        one_hot = torch.nn.functional.one_hot(types, 5).float() / 4
        clean = torch.cat([pos.float(), one_hot, torch.zeros(b, n, 1)], dim=-1)
        # step j: the clean prediction is the final molecule pulled apart by (T - j) * 0.1 Å per atom index
        frames = [clean.clone() for _ in range(num_steps)]
        for j, f in enumerate(frames):
            f[..., :3] *= 1.0 + 0.1 * (num_steps - 1 - j)
        payload["z0_pred"] = torch.stack(frames, dim=1)
    return Rollout(group_ids=torch.zeros(b, dtype=torch.long), logp_old=torch.zeros(b, num_steps),
                   step_mask=torch.ones(b, num_steps, dtype=torch.bool), payload=payload)


def reward(force_field, **kw):
    args = dict(force_field=force_field, force_aggregation="rms", force_clip_ev_per_angstrom=None, use_energy=True,
                atom_refs_ev={1: -10.707211, 6: -48.798080, 7: -70.908087, 8: -102.521807, 9: -125.698643},
                energy_per_atom=True, energy_offset_ev=0.0, energy_scale_ev=1.0, energy_clip=None,
                stability_weight=0.0, atom_stability_weight=0.0, underbond_weight=0.0, overbond_weight=0.0,
                soft_underbond_weight=0.0, soft_overbond_weight=0.0, soft_temperature_angstrom=0.1,
                force_only_if_stable=False, energy_only_if_stable=False)
    args.update(kw)
    return ForceFieldReward(**args)


@pytest.fixture(scope="module")
def xtb():
    ff = XTBForceField(num_workers=0, accuracy=1.0, max_iterations=250, electronic_temperature=300.0)
    yield ff
    ff.close()


def test_relaxed_molecule_has_smaller_forces_than_distorted(xtb):
    pos, z = conformer("CCO")
    rng = np.random.default_rng(0)
    distorted = pos + rng.normal(scale=0.15, size=pos.shape)
    out = reward(xtb)(make_rollout([(pos, z), (distorted, z)]))
    force, energy = out.channels["force"], out.channels["energy"]
    assert force[0] > force[1], "distorted ethanol must have larger forces (lower force reward)"
    assert energy[0] > energy[1], "distorted ethanol must have higher energy (lower energy reward)"
    assert -7.0 < -energy[0].item() < -2.0, "GFN2 formation energy per atom of ethanol: about -5 eV"
    assert out.metrics["rollout/molecule_stability"] == 0.5
    assert not out.failures


def test_failed_molecule_is_nan_with_reason_and_engine_penalty(xtb):
    pos, z = conformer("C")
    bad = pos.copy()
    bad[1] = np.nan
    rollout = make_rollout([(pos, z), (bad, z)])
    out = reward(xtb)(rollout)
    assert math.isnan(out.channels["force"][1]) and math.isnan(out.channels["energy"][1])
    assert out.failures == {"ff_nonfinite_positions": 1}
    strategy = FedGRPOStrategy({"force": 1.0, "energy": 0.1}, 1.0, "terminal", 1.0, 5.0, 1e-8, 0.2, 0.0)
    scored, metrics = RewardBook(failure_penalty=-7.0)(out, rollout, strategy.reward_weights)
    assert metrics["reward/failed_ff_nonfinite_positions"] == 1.0
    assert metrics["reward/force_failed"] == 1.0
    assert scored.channels["force"][1] == -7.0 and scored.channels["energy"][1] == -7.0


def test_stability_bonus_gate_and_penalties_enter_force_channel():
    pos, z = conformer("CCO")
    stretched = pos.copy()
    stretched[-1] += np.array([1.5, 0.0, 0.0])  # pull one H off: two atoms lose a bond
    ff = DummyForceField(energy=-1.0)
    out = reward(ff, stability_weight=2.0, atom_stability_weight=3.0, underbond_weight=1.0,
                 energy_only_if_stable=True)(make_rollout([(pos, z), (stretched, z)]))
    n = len(z)
    assert out.channels["force"][0].item() == pytest.approx(2.0)  # stable: +w_s, no penalties, zero forces
    expected = -2.0 - 3.0 * (2 / n) - 1.0 * 2  # unstable, 2 unstable atoms, 2 missing bonds
    assert out.channels["force"][1].item() == pytest.approx(expected, rel=1e-5)
    assert out.channels["energy"][1].item() == 0.0, "energy gated by stability"


def test_fragment_penalty_counts_pieces_beyond_the_first():
    pos, z = conformer("CCO")
    apart = pos.copy()
    apart[-1] += np.array([3.0, 0.0, 0.0])  # one H leaves: two pieces
    apart[-2] += np.array([0.0, 3.0, 0.0])  # another H leaves: three pieces
    out = reward(DummyForceField(energy=-1.0), fragment_weight=0.5)(make_rollout([(pos, z), (apart, z)]))
    assert out.channels["force"][0].item() == 0.0
    assert out.channels["force"][1].item() == pytest.approx(-0.5 * 2)
    assert out.metrics["rollout/fragments_per_molecule"] == pytest.approx(2.0)
    with pytest.raises(Exception, match="fragment_weight"):
        reward(DummyForceField(energy=-1.0), fragment_weight=-1.0)


def test_log_force_scale_enters_the_force_channel_and_metrics_stay_in_ev_per_angstrom(xtb):
    pos, z = conformer("CCO")
    distorted = pos + np.random.default_rng(0).normal(scale=0.15, size=pos.shape)
    rollout = make_rollout([(pos, z), (distorted, z)])
    linear, log = reward(xtb)(rollout), reward(xtb, force_scale="log")(rollout)
    assert torch.allclose(log.channels["force"], -torch.log(-linear.channels["force"]), rtol=1e-5)
    assert log.metrics["force_rms_ev_per_angstrom"] == linear.metrics["force_rms_ev_per_angstrom"]
    with pytest.raises(ConfigError, match="force_scale"):
        reward(xtb, force_scale="sqrt")


def test_shaping_potentials_rise_as_the_prediction_relaxes(xtb):
    pos, z = conformer("CO")
    rollout = make_rollout([(pos, z), (pos, z)], num_steps=4, z0_pred=True)
    shaping = PotentialShaping(RewardScheduler("uniform", 1, 1, 1, 1, 0.25, True), ["energy"], 3)
    out = reward(xtb, shaping=shaping)(rollout)
    assert out.potential_mask.tolist() == [False, True, True, True]
    psi = out.potentials["energy"][0]
    assert torch.isnan(psi[0]), "unscheduled step carries no potential"
    assert psi[1] < psi[2] < psi[3], "the stretched early predictions have higher energy (lower potential)"
    assert out.metrics["shaping_evaluations"] == 6.0


def test_filter_penalties_and_dedup():
    mol = conformer("CCO")
    other = conformer("CC")
    # invalid: a carbon with five hydrogens at bonding distance cannot be sanitised
    pent = (np.array([[0, 0, 0], [1.09, 0, 0], [-1.09, 0, 0], [0, 1.09, 0], [0, -1.09, 0], [0, 0, 1.09]]),
            [6, 1, 1, 1, 1, 1])
    rollout = make_rollout([mol, mol, mol, other, pent])
    out = reward(DummyForceField(0.0), use_energy=False)(rollout)
    out.channels["force"] = torch.tensor([-1.0, -2.0, -3.0, -4.0, -0.5])
    filt = ChemistryFilter(invalid_penalty=1.0, duplicate_penalty=0.3, novelty_penalty=0.0, dedup=True,
                           reference_smiles=None, rank_channel="force")
    out = filt(rollout, out)
    f = out.channels["force"]
    assert out.keep.tolist() == [True, False, False, True, True], "keep the best copy and the invalid one"
    assert f[0].item() == pytest.approx(-1.0 - 0.3 * 2)  # kept copy carries the whole duplicate penalty
    assert f[3].item() == pytest.approx(-4.0)
    assert f[4].item() == pytest.approx(min(-1.6, -2.6, -3.6, -4.0) - 1.0), "invalid: lowest valid - penalty"
    assert out.metrics["rollout/validity"] == pytest.approx(0.8)
    assert out.metrics["rollout/uniqueness"] == pytest.approx(0.5)


def test_filter_novelty_against_reference(tmp_path):
    ref = tmp_path / "ref.txt"
    ref.write_text("CCO\n")
    rollout = make_rollout([conformer("CCO"), conformer("CC")])
    out = reward(DummyForceField(0.0), use_energy=False)(rollout)
    out = ChemistryFilter(0.0, 0.0, 0.5, False, str(ref), "force")(rollout, out)
    assert out.channels["force"].tolist() == pytest.approx([-0.5, 0.0])
    assert out.metrics["rollout/novelty"] == 0.5
