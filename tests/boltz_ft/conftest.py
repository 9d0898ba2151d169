"""Fixtures of the Boltz-2 domain: the tiny official model and featurized embedded targets."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("boltz")

REPO = Path(__file__).resolve().parents[2]
PDB_DIR = REPO / "boltz_ft" / "data" / "pdb"  # the shipped copies of ../shared/data/pdb
TINY_CONFIG = REPO / "conf" / "model" / "boltz" / "tiny.yaml"
POLICY_CONFIG = REPO / "conf" / "model" / "boltz" / "policy.yaml"  # sft and lora of every backend


def tiny_backend_arguments(seed: int = 0) -> dict:
    """The ``backend`` node of ``conf/model/boltz/tiny.yaml`` as keyword arguments of build_boltz2."""
    from omegaconf import OmegaConf

    node = OmegaConf.load(TINY_CONFIG).backend
    node.seed = seed
    args = OmegaConf.to_container(node, resolve=True)
    args.pop("_target_")
    return args


@pytest.fixture(scope="session")
def ccd():
    from boltz_ft.ccd import CCDMolecules

    return CCDMolecules()


@pytest.fixture
def tiny_boltz2():
    from boltz_ft.backend import build_boltz2

    return build_boltz2(**tiny_backend_arguments(seed=0))


@pytest.fixture(scope="session")
def crambin(ccd):
    """1crn parsed by boltz's parser."""
    path = PDB_DIR / "1crn.pdb"
    from boltz_ft.data import load_structure

    return load_structure(path, ccd)


@pytest.fixture
def crambin_features(crambin, ccd):
    """1crn cropped to 24 tokens: the unbatched §1.3 feature dict."""
    from boltz_ft.data import featurize

    return featurize(crambin, ccd, seed=0, max_tokens=24)
