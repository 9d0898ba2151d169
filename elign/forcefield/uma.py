"""fairchem UMA energies and forces, batched through fairchem's own data pipeline.

Each molecule becomes an ``ase.Atoms`` (no periodic boundaries; ``info["charge"]``,
``info["spin"]`` = total charge and spin multiplicity), then a fairchem ``AtomicData`` for the
configured task (``"omol"`` for molecules; the model builds its own radius graph with the cutoff
stored in the checkpoint, 6 Å for UMA). Molecules are collated with
``atomicdata_list_to_batch`` into chunks of ``batch_size`` and each chunk goes through ONE
``predictor.predict`` call. fairchem returns energies in eV and forces in eV/Å (the released
UMA models are conserving: forces are ``-dE/dx`` by autograd), so no conversion is needed.

Loading: ``model`` is a fairchem model name (``"uma-s-1p1"``, ``"uma-m-1p1"``, ...; downloading
it needs your own Hugging Face access to the gated ``facebook/UMA`` repository) or the path of a
local checkpoint file (e.g. one built by :func:`elign.forcefield.uma_tiny.build_random_uma_checkpoint`).
A model that cannot be loaded raises :class:`UMALoadError` at construction; nothing continues
with zero forces.

Per-molecule failures: ``no_edges`` (no atom pair within the cutoff, including single atoms:
the model has nothing to pass messages on), ``atoms_overlap`` (two atoms within 0.01 Å, which
fairchem's graph would silently merge), ``unsupported_element`` (Z beyond the model's
embedding table), ``predict_failed`` (fairchem raised for this molecule alone),
``nonfinite_output`` (NaN/inf energy or forces).

CPU performance (measured with random-weight checkpoints, 1 thread, QM9-size molecules): the work
per molecule dominates, so batching gains ~2x at best for a tiny model and nothing for a UMA-S
sized one; beyond ~16 molecules per call throughput falls again, because fairchem's unmerged
Mixture-of-Linear-Experts layer slices the edge tensor once per system and the backward pass of
each slice writes a full-size zero gradient (cost grows with batch_size squared). On a CPU keep
``batch_size`` around 8-16 and prefer "traineval" (no activation-checkpoint recomputation); the
large batches are for GPUs.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from elign.engine.errors import ConfigError, check_int
from elign.forcefield.base import (MAX_FORCE_EV_PER_ANGSTROM, MIN_DISTANCE_ANGSTROM, ForceField, Molecule,
                                   MoleculeResult)
from elign.forcefield.kernels import SAME_ATOM_DISTANCE, min_pair_distance

logger = logging.getLogger(__name__)

DEVICES = ("cpu", "cuda")
DTYPES = ("float32", "float64")


class UMALoadError(RuntimeError):
    """A UMA model could not be loaded; the message names the model and the cause."""


def load_uma_predictor(model: str, inference_settings: str, device: str, dtype: str) -> Any:
    """Load a fairchem predict unit from a model name or a local checkpoint path.

    Args:
        model: a name in ``fairchem.core.calculate.pretrained_mlip.available_models`` or the path
            of a checkpoint file.
        inference_settings: a fairchem preset ("batch", "traineval", "default", ...). On a CPU use
            "batch" or "traineval": the default preset compiles/merges experts for one fixed
            composition and fails there.
        device: "cpu" or "cuda".
        dtype: "float32" or "float64" (model and input precision).

    Returns:
        ``MLIPPredictUnit``.

    Raises:
        UMALoadError: if the model cannot be found or loaded (the cause is chained).
    """
    from fairchem.core.calculate import pretrained_mlip
    from fairchem.core.units.mlip_unit import load_predict_unit
    from fairchem.core.units.mlip_unit.api.inference import NAME_TO_INFERENCE_SETTING

    if inference_settings not in NAME_TO_INFERENCE_SETTING:
        raise ConfigError("inference_settings", inference_settings, NAME_TO_INFERENCE_SETTING)
    # Private copy of the preset: the presets are shared module-level objects in fairchem.
    settings = copy.deepcopy(NAME_TO_INFERENCE_SETTING[inference_settings])
    settings.base_precision_dtype = getattr(torch, dtype)
    # fairchem would otherwise add an autograd stress task per energy task; we only use energy
    # and forces, and the stress costs an extra gradient w.r.t. the cell.
    settings.auto_add_default_untrained_tasks = False

    if model in pretrained_mlip.available_models:
        try:
            return pretrained_mlip.get_predict_unit(model, inference_settings=settings, device=device)
        except Exception as err:
            raise UMALoadError(
                f"could not load the fairchem model {model!r} ({type(err).__name__}: {err}). "
                "Named UMA models are downloaded from the gated Hugging Face repo facebook/UMA "
                "and need your own access (licence accepted, HF_TOKEN set, network); offline, "
                "set model to the path of a local checkpoint file instead."
            ) from err
    path = Path(model).expanduser()
    if not path.is_file():
        raise UMALoadError(
            f"UMA model {model!r} is neither a fairchem model name "
            f"({', '.join(pretrained_mlip.available_models)}) nor an existing checkpoint file"
        )
    try:
        return load_predict_unit(str(path), inference_settings=settings, device=device)
    except Exception as err:
        raise UMALoadError(
            f"could not load the UMA checkpoint {str(path)!r} with inference_settings="
            f"{inference_settings!r} on {device}: {type(err).__name__}: {err}"
        ) from err


class UMAForceField(ForceField):
    """fairchem UMA energies (eV) and forces (eV/Å) for a padded batch; see the module docstring.

    All arguments are keyword-only (they map one-to-one onto the Hydra config keys).

    Args:
        model: fairchem model name (e.g. "uma-s-1p1"; needs your access to the weights) or the
            path of a local checkpoint file.
        batch_size: molecules per ``predictor.predict`` call (bounds memory; see the module
            docstring for CPU throughput).
        task_name: UMA task; "omol" for molecules.
        inference_settings: fairchem preset: "batch" (heterogeneous batches, activation
            checkpointing) or "traineval"; the "default" preset (merged experts + compile) is
            meant for one fixed composition on a GPU.
        device: "cpu" or "cuda".
        charge: total charge of every molecule, e (``atoms.info["charge"]``).
        spin: spin multiplicity of every molecule (``atoms.info["spin"]``; 1 = singlet).
        dtype: "float32" (fairchem's default) or "float64" (for finite-difference checks).
        min_distance_angstrom, max_force_ev_per_angstrom: see :class:`~elign.forcefield.base.ForceField`
            (an ML potential extrapolates without complaint far outside its training data).

    Raises:
        UMALoadError: the model cannot be loaded.
        ConfigError: a bad argument value, or a task the model does not have.
    """

    def __init__(
        self,
        *,
        model: str,
        batch_size: int,
        task_name: str = "omol",
        inference_settings: str = "batch",
        device: str = "cpu",
        charge: int = 0,
        spin: int = 1,
        dtype: str = "float32",
        min_distance_angstrom: float = MIN_DISTANCE_ANGSTROM,
        max_force_ev_per_angstrom: float | None = MAX_FORCE_EV_PER_ANGSTROM,
    ) -> None:
        super().__init__(min_distance_angstrom=min_distance_angstrom, max_force_ev_per_angstrom=max_force_ev_per_angstrom)
        self.batch_size = check_int("batch_size", batch_size, 1)
        if device not in DEVICES:
            raise ConfigError("device", device, DEVICES)
        if dtype not in DTYPES:
            raise ConfigError("dtype", dtype, DTYPES)
        # fairchem's own ranges for omol (api/inference.py: CHARGE_RANGE, SPIN_RANGE)
        self.charge = check_int("charge", charge, -100, 100)
        self.spin = check_int("spin", spin, 0, 100)
        self.model = model
        self.task_name = task_name
        self.predictor = load_uma_predictor(model, inference_settings, device, dtype)

        tasks = self.predictor.dataset_to_tasks
        if task_name not in tasks:
            raise ConfigError("task_name", task_name, sorted(tasks))
        properties = {t.property for t in tasks[task_name]}
        if not {"energy", "forces"} <= properties:
            raise UMALoadError(
                f"UMA model {model!r} predicts {sorted(properties)} for task {task_name!r}; "
                "energy and forces are both needed"
            )
        backbone = self.predictor.model.module.backbone
        self.cutoff = float(backbone.cutoff)  # Å; the model's radius graph
        self.max_atomic_number = int(backbone.max_num_elements) - 1  # embedding rows 0..max-1
        self._dtype = getattr(torch, dtype)

    def compute_molecules(self, molecules: Sequence[Molecule]) -> list[MoleculeResult]:
        """UMA single points of unpadded molecules, ``batch_size`` per predict call."""
        results: list[MoleculeResult | None] = [None] * len(molecules)
        todo: list[int] = []
        for i, (numbers, positions) in enumerate(molecules):
            if numbers.max() > self.max_atomic_number:
                results[i] = MoleculeResult.failed("unsupported_element")
                continue
            nearest = min_pair_distance(positions)
            if nearest >= self.cutoff:
                results[i] = MoleculeResult.failed("no_edges")
            elif nearest < SAME_ATOM_DISTANCE:
                results[i] = MoleculeResult.failed("atoms_overlap")
            else:
                todo.append(i)
        first_error: Exception | None = None
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start : start + self.batch_size]
            chunk_results, error = self._predict_chunk([molecules[i] for i in chunk])
            first_error = first_error or error
            for i, res in zip(chunk, chunk_results):
                results[i] = res
        # Exceptions are per-molecule failures only while other molecules succeed; when nothing
        # could be evaluated the cause is the model or the environment (a bug, out of memory):
        # raise it rather than hand back a batch of NaNs.
        if todo and first_error is not None and all(results[i].reason == "predict_failed" for i in todo):
            raise first_error
        return results  # type: ignore[return-value]

    def _predict_chunk(self, molecules: list[Molecule]) -> tuple[list[MoleculeResult], Exception | None]:
        """One ``predict`` call for the chunk; if it raises, re-run the molecules one at a time
        so that one bad molecule does not fail its whole chunk. Returns the results and the
        first exception seen (None if the chunk went through)."""
        try:
            return self._predict(molecules), None
        except Exception as err:  # noqa: BLE001 - isolated per molecule below
            first_error: Exception = err
        out: list[MoleculeResult] = []
        for mol in molecules:
            try:
                out.extend(self._predict([mol]))
            except Exception as err:  # noqa: BLE001
                logger.warning("UMA predict failed for a molecule (%d atoms): %s: %s", len(mol[0]), type(err).__name__, err)
                out.append(MoleculeResult.failed("predict_failed"))
        return out, first_error

    def _predict(self, molecules: list[Molecule]) -> list[MoleculeResult]:
        from ase import Atoms
        from fairchem.core.datasets.atomic_data import AtomicData, atomicdata_list_to_batch

        data_list = []
        for numbers, positions in molecules:
            atoms = Atoms(numbers=numbers, positions=positions, pbc=False)
            atoms.info["charge"] = self.charge
            atoms.info["spin"] = self.spin
            data_list.append(
                AtomicData.from_ase(
                    atoms,
                    task_name=self.task_name,
                    r_edges=False,  # the model builds its radius graph itself (otf_graph)
                    radius=self.cutoff,
                    r_data_keys=["spin", "charge"],
                    target_dtype=self._dtype,
                )
            )
        batch = atomicdata_list_to_batch(data_list)
        # Conserving models differentiate the energy w.r.t. positions: grad must be on even when
        # the caller (e.g. a rollout) runs under torch.no_grad().
        with torch.enable_grad():
            pred = self.predictor.predict(batch)
        energy = pred["energy"].detach().to("cpu", torch.float64).numpy().reshape(-1)
        forces = pred["forces"].detach().to("cpu", torch.float64).numpy()
        if energy.shape[0] != len(molecules):
            raise RuntimeError(f"fairchem returned {energy.shape[0]} energies for {len(molecules)} molecules")
        sizes = [len(z) for z, _ in molecules]
        per_molecule = np.split(forces, np.cumsum(sizes)[:-1])
        return [MoleculeResult(float(e), f) for e, f in zip(energy, per_molecule)]

    def __repr__(self) -> str:
        return f"UMAForceField(model={self.model!r}, task_name={self.task_name!r}, batch_size={self.batch_size})"

