"""Random-weight UMA-architecture checkpoints, built offline.

The real UMA weights are gated (Hugging Face licence + token) and cannot be downloaded on our
machines, so tests and benchmarks build a model with the *same architecture* (fairchem's
``eSCNMDMoeBackbone`` with Mixture-of-Linear-Experts + the dataset-specific energy/force head)
and random weights, and save it in fairchem's own inference-checkpoint format
(``MLIPInferenceCheckpoint``). ``fairchem.core.units.mlip_unit.load_predict_unit(path, ...)``
loads it exactly like a released checkpoint, so the whole :class:`~elign.forcefield.uma.UMAForceField`
code path (loading, AtomicData conversion, batching, predict) is exercised.

The energies of such a model are meaningless numbers; only shapes, units handling, batching and
energy/force consistency (forces are −dE/dx by autograd, as in the released conserving UMA) can
be tested with it.

Sizes:

- ``"small"``: UMA-S sized. Backbone hyper-parameters follow fairchem's UMA-S training recipe
  (in the fairchem GitHub repository, not the installed package:
  ``configs/uma/training_release/backbone/K4L2.yaml`` + ``uma_sm_conserve_finetune.yaml``):
  4 layers, lmax = mmax = 2, 128 sphere/hidden/edge channels, 64 Gaussian distance functions,
  6 Å cutoff, 32 experts, composition embedding, random charge/spin embeddings, conserving
  forces (``direct_forces=False``), five dataset heads. 146.6 M parameters (UMA-S is published
  as ~150 M total, ~6 M active per system once the experts are mixed); a 560 MiB file.
- ``"tiny"``: the same architecture at 2 layers, 16 channels, 4 experts: 0.17 M parameters,
  a 1 MiB file, fast enough for unit tests on a CPU.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import torch

#: Datasets (= UMA tasks) the released UMA-S 1.1 knows; the head and the dataset embedding are
#: built for all of them so the checkpoint has the real layout, but tasks are only defined for
#: ``omol`` (molecules), the one this project uses.
UMA_DATASETS: tuple[str, ...] = ("oc20", "omol", "omat", "odac", "omc")

#: Energy/force normaliser RMSD of the UMA-S recipe (``normalizer_rmsd`` in the training config).
_NORMALIZER_RMSD = 1.423

# Backbone hyper-parameters. Keys are eSCNMDMoeBackbone / eSCNMDBackbone constructor arguments.
_BACKBONE_COMMON: dict[str, Any] = {
    "model": "fairchem.core.models.uma.escn_moe.eSCNMDMoeBackbone",
    "max_num_elements": 100,
    "otf_graph": True,  # the model builds its own radius graph at inference
    "max_neighbors": 300,
    "use_pbc": True,
    "use_pbc_single": True,
    "cutoff": 6.0,  # Å
    "distance_function": "gaussian",
    "regress_forces": True,
    "regress_stress": False,
    "direct_forces": False,  # conserving: forces = -dE/dx by autograd
    "norm_type": "rms_norm_sh",
    "act_type": "gate",
    "ff_type": "spectral",
    "chg_spin_emb_type": "rand_emb",
    "cs_emb_grad": True,
    "dataset_mapping": {d: d for d in UMA_DATASETS},
    "use_composition_embedding": True,
    "use_global_embedding": False,
    "moe_dropout": 0.0,
    "moe_layer_type": "pytorch",  # the only MoLE kernel that runs on a CPU
}

_SIZES: dict[str, dict[str, Any]] = {
    "small": {
        "num_layers": 4,
        "lmax": 2,
        "mmax": 2,
        "sphere_channels": 128,
        "hidden_channels": 128,
        "edge_channels": 128,
        "num_distance_basis": 64,
        "num_experts": 32,
    },
    "tiny": {
        "num_layers": 2,
        "lmax": 2,
        "mmax": 2,
        "sphere_channels": 16,
        "hidden_channels": 16,
        "edge_channels": 16,
        "num_distance_basis": 16,
        "num_experts": 4,
    },
}

#: ``model_id`` written into the checkpoint. fairchem refuses an untagged MoE UMA checkpoint
#: (``models/uma/compat.py``); a custom id is treated as "tagged" and changes no behaviour
#: (only the id "UMA-S-1.2" switches on that release's composition-embedding quirk).
MODEL_ID_PREFIX = "ELIGN-random-UMA"


def uma_model_config(size: Literal["tiny", "small"]) -> dict[str, Any]:
    """The Hydra ``model_config`` of a random UMA model of the given ``size`` (a plain dict)."""
    if size not in _SIZES:
        raise ValueError(f"size={size!r}; allowed: {', '.join(_SIZES)}")
    backbone = {**_BACKBONE_COMMON, **_SIZES[size]}
    return {
        "_target_": "fairchem.core.models.base.HydraModel",
        "model_id": f"{MODEL_ID_PREFIX}-{size}",
        "backbone": backbone,
        "heads": {
            # One MLP energy head per dataset (DatasetSpecificSingleHeadWrapper), forces by
            # autograd of the energy: the layout of the released conserving UMA-S.
            "energyandforcehead": {
                "module": "fairchem.core.models.uma.escn_moe.DatasetSpecificSingleHeadWrapper",
                "head_cls": "fairchem.core.models.uma.escn_md.MLP_EFS_Head",
                "head_kwargs": {"wrap_property": False},
                "dataset_names": list(UMA_DATASETS),
            }
        },
        # Head outputs are already named "<dataset>_<property>", the task names below.
        "pass_through_head_outputs": True,
    }


def omol_tasks_config() -> list[dict[str, Any]]:
    """Task definitions (energy per system, forces per atom) for the ``omol`` dataset."""
    normalizer = {
        "_target_": "fairchem.core.modules.normalization.normalizer.Normalizer",
        "mean": 0.0,
        "rmsd": _NORMALIZER_RMSD,
    }
    task = "fairchem.core.units.mlip_unit.mlip_unit.Task"
    return [
        {
            "_target_": task,
            "name": "omol_energy",
            "level": "system",
            "property": "energy",
            "out_spec": {"dim": [1], "dtype": "float32"},
            "normalizer": copy.deepcopy(normalizer),
            "datasets": ["omol"],
        },
        {
            "_target_": task,
            "name": "omol_forces",
            "level": "atom",
            "property": "forces",
            "out_spec": {"dim": [3], "dtype": "float32"},
            "normalizer": copy.deepcopy(normalizer),
            "datasets": ["omol"],
            "train_on_free_atoms": True,
            "eval_on_free_atoms": True,
        },
    ]


def build_random_uma_checkpoint(
    path: str | Path, size: Literal["tiny", "small"] = "tiny", seed: int = 0
) -> Path:
    """Build a UMA-architecture model with random weights and save it as an inference checkpoint.

    Args:
        path: Output file (``.pt``); parent folders are created.
        size: ``"tiny"`` (fast tests) or ``"small"`` (UMA-S sized, see the module docstring).
        seed: Seed of the random initialisation (same seed → same weights).

    Returns:
        The path written. Load it with
        ``fairchem.core.units.mlip_unit.load_predict_unit(path, inference_settings="batch",
        device="cpu")`` or :class:`elign.forcefield.uma.UMAForceField`.
    """
    import hydra
    from fairchem.core.units.mlip_unit.api.inference import MLIPInferenceCheckpoint

    model_config = uma_model_config(size)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Fork the global RNG so building a checkpoint does not perturb the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = hydra.utils.instantiate(copy.deepcopy(model_config))
    state = model.state_dict()
    # The inference loader reads the EMA weights (use_ema=True) in the key layout of
    # torch.optim.swa_utils.AveragedModel: "module.<key>" plus an "n_averaged" counter. The EMA
    # entries are the same tensors as the model's, and torch.save stores shared tensors once, so
    # the file holds one copy of the weights (~0.6 GB for "small") instead of two.
    ema_state = {"n_averaged": torch.tensor(1, dtype=torch.long)}
    ema_state.update({f"module.{key}": value for key, value in state.items()})
    checkpoint = MLIPInferenceCheckpoint(
        model_config=model_config,
        model_state_dict=state,
        ema_state_dict=ema_state,
        tasks_config=omol_tasks_config(),
    )
    # Write to a temporary name then rename, so an interrupted build never leaves a truncated
    # file that a later run would try to load.
    tmp = path.with_name(path.name + ".tmp")
    torch.save(checkpoint, tmp)
    tmp.replace(path)
    return path

