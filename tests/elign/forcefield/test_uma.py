"""fairchem UMA with a random-weight UMA-architecture checkpoint built offline by the test."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

pytest.importorskip("fairchem.core")

from elign.engine.errors import ConfigError  # noqa: E402
from elign.forcefield.uma import UMAForceField, UMALoadError  # noqa: E402
from elign.forcefield.uma_tiny import build_random_uma_checkpoint, uma_model_config  # noqa: E402

from .molecules import WATER, embed, finite_difference_forces, pad  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    # Small graphs gain nothing from intra-op threads, and on a shared machine OpenMP threads
    # that spin on busy cores make these tests many times slower.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_random_uma_checkpoint(tmp_path_factory.mktemp("uma") / "tiny.pt", size="tiny", seed=0)


@pytest.fixture(scope="module")
def uma64(checkpoint):
    # float64 so that finite differences are exact to ~1e-9
    return UMAForceField(model=str(checkpoint), batch_size=64, inference_settings="batch", dtype="float64")


def test_checkpoint_loads_with_fairchem_and_is_deterministic(checkpoint, tmp_path):
    from fairchem.core.units.mlip_unit import load_predict_unit

    unit = load_predict_unit(str(checkpoint), inference_settings="traineval", device="cpu")
    assert "omol" in unit.dataset_to_tasks
    again = build_random_uma_checkpoint(tmp_path / "again.pt", size="tiny", seed=0)
    a = torch.load(checkpoint, weights_only=False).model_state_dict
    b = torch.load(again, weights_only=False).model_state_dict
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_small_config_is_uma_s_sized():
    backbone = uma_model_config("small")["backbone"]
    assert (backbone["num_layers"], backbone["sphere_channels"], backbone["lmax"], backbone["num_experts"]) == (4, 128, 2, 32)
    with pytest.raises(ValueError, match="size"):
        uma_model_config("huge")


def test_forces_are_minus_energy_gradient(uma64):
    mol = embed("CCO", seed=0, noise=0.05)
    with torch.no_grad():  # as in a rollout: the backend must still get its autograd forces
        res = uma64(*pad([mol]))
    assert res.ok.item()
    forces = res.forces[0].numpy()
    assert np.abs(forces).max() > 1e-3  # random weights: small but non-zero
    fd = finite_difference_forces(uma64, mol, h=1e-4)
    np.testing.assert_allclose(forces, fd, atol=1e-7 + 1e-4 * np.abs(forces).max())


def test_padded_batch_equals_one_at_a_time(checkpoint):
    ff = UMAForceField(model=str(checkpoint), batch_size=3, dtype="float32")  # 5 molecules -> 2 chunks
    mols = [WATER, embed("CO", seed=1, noise=0.05), embed("CCO", seed=2, noise=0.05), embed("CC(=O)N", seed=3, noise=0.05), embed("C#N", seed=4)]
    pos, z, mask = pad(mols, front=1)
    res = ff(pos.float(), z, mask)
    assert res.ok.all()
    assert (res.forces[~mask] == 0).all()
    for i, mol in enumerate(mols):
        single = ff(*pad([mol]))
        assert res.energy[i].item() == pytest.approx(single.energy.item(), abs=1e-5)
        np.testing.assert_allclose(res.forces[i][mask[i]].numpy(), single.forces[0].numpy(), atol=1e-5)


def test_bad_molecules_fail_with_reason_and_nan(uma64, monkeypatch):
    z, p = embed("CCO", seed=2)
    overlap = (z, p.copy())
    overlap[1][1] = overlap[1][0]
    assert uma64(*pad([overlap])).reasons == ["below_min_distance"]  # the shared check comes first
    monkeypatch.setattr(uma64, "min_distance_angstrom", 0.0)  # without it, UMA's own guard
    far_apart = (np.array([8, 8]), np.array([[0.0, 0.0, 0.0], [7.0, 0.0, 0.0]]))  # beyond the 6 Å cutoff
    single_atom = (np.array([6]), np.zeros((1, 3)))
    unknown = (np.array([6, 110]), np.array([[0.0, 0.0, 0.0], [1.5, 0.0, 0.0]]))
    pos, z, mask = pad([WATER, overlap, far_apart, single_atom, unknown], front=1)
    res = uma64(pos, z, mask)
    assert res.reasons == [None, "atoms_overlap", "no_edges", "no_edges", "unsupported_element"]
    assert res.ok.tolist() == [True, False, False, False, False]
    assert all(math.isnan(e) for e in res.energy[1:].tolist())
    assert torch.isnan(res.forces[1:][mask[1:]]).all() and (res.forces[~mask] == 0).all()
    assert res.energy[0].item() == pytest.approx(uma64(*pad([WATER])).energy.item(), abs=1e-12)


def test_missing_checkpoint_raises_clear_error(tmp_path):
    missing = tmp_path / "no_such_model.pt"
    with pytest.raises(UMALoadError, match="neither a fairchem model name.*nor an existing checkpoint"):
        UMAForceField(model=str(missing), batch_size=8)


def test_corrupt_checkpoint_raises_clear_error(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(UMALoadError, match="could not load the UMA checkpoint"):
        UMAForceField(model=str(bad), batch_size=8)


def test_bad_config_names_the_key(checkpoint):
    with pytest.raises(ConfigError, match="batch_size"):
        UMAForceField(model=str(checkpoint), batch_size=0)
    with pytest.raises(ConfigError, match="task_name"):
        UMAForceField(model=str(checkpoint), batch_size=8, task_name="omat_typo")
    with pytest.raises(ConfigError, match="inference_settings"):
        UMAForceField(model=str(checkpoint), batch_size=8, inference_settings="turbo2")
    for key, value in (("batch_size", math.nan), ("charge", math.inf), ("spin", 1.5),
                       ("min_distance_angstrom", math.nan), ("max_force_ev_per_angstrom", 0.0)):
        with pytest.raises(ConfigError, match=key):
            UMAForceField(model=str(checkpoint), **{"batch_size": 8, key: value})


def test_predict_exception_isolated_to_its_molecule(checkpoint, monkeypatch):
    ff = UMAForceField(model=str(checkpoint), batch_size=8)
    real_predict = ff.predictor.predict

    def predict_failing_on_two_atom_systems(batch):
        if (batch.natoms == 2).any():
            raise RuntimeError("simulated per-molecule failure")
        return real_predict(batch)

    monkeypatch.setattr(ff.predictor, "predict", predict_failing_on_two_atom_systems)
    o2 = (np.array([8, 8]), np.array([[0.0, 0.0, 0.0], [1.2, 0.0, 0.0]]))
    res = ff(*pad([WATER, o2, WATER]))
    assert res.reasons == [None, "predict_failed", None]
    assert res.ok.tolist() == [True, False, True]
    # when nothing at all can be evaluated, the cause is raised instead of returning NaNs
    with pytest.raises(RuntimeError, match="simulated"):
        ff(*pad([o2, o2]))


def test_named_model_without_access_raises_clear_error(monkeypatch):
    import huggingface_hub
    from fairchem.core._config import CACHE_DIR

    if isinstance(huggingface_hub.try_to_load_from_cache("facebook/UMA", "checkpoints/uma-s-1p1.pt", cache_dir=CACHE_DIR), str):
        pytest.skip("uma-s-1p1 is in the local cache: loading would succeed")
    # offline mode makes the download fail at once instead of after network retries
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UMALoadError, match="uma-s-1p1.*Hugging Face.*local checkpoint"):
        UMAForceField(model="uma-s-1p1", batch_size=8)
