"""Held-out evaluation of sampled structures against the truth: lDDT, RMSD, TM-score, clashes, distogram CE.

Each target is cropped once with a fixed seed (the same crop at every evaluation and for every model), the
policy samples ``diffusion_samples`` structures with boltz's sampler under a fixed seed, and the metrics
of :mod:`boltz_ft.metrics` are averaged over samples and targets. The last evaluation's predictions are
written as mmCIF (and PDB) next to PNGs of the predicted vs true Cα distance maps and per-residue lDDT.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Sequence

import torch

from elign.engine.errors import check_int
from boltz_ft.ccd import CCDMolecules
from boltz_ft.data import featurize, split_batch
from boltz_ft.dataset import load_targets

__all__ = ["StructureEvaluator"]

METRICS = ("ca_lddt", "rmsd_ca", "tm_score", "clash_fraction", "chain_break")


def _run_dir() -> Path | None:
    """The Hydra run directory of rank 0 (other ranks write nothing); None outside a Hydra job."""
    if int(os.environ.get("RANK", "0")) != 0:
        return None
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except (ValueError, ImportError):
        return None


class StructureEvaluator:
    """Samples structures of fixed crops of held-out (or training) targets and scores them.

    Args:
        paths: structure files or folders (``package:`` paths allowed).
        ids: target ids to evaluate; None = all.
        max_tokens: crop size (None = whole targets).
        diffusion_samples: structures sampled per target.
        sampling_steps: reverse-sampler steps.
        recycling_steps: trunk recycling passes.
        seed: seed of the crops and of the sampling noise (the same at every evaluation).
        out_dir: where predictions and plots go; None = the run directory (rank 0), if any.
        write_structures: write the last evaluation's samples as mmCIF and PDB.
        plots: write distance-map and per-residue-lDDT PNGs.
    """

    def __init__(self, paths: Sequence[str], ids: Sequence[str] | None = None, max_tokens: int | None = 64,
                 diffusion_samples: int = 4, sampling_steps: int = 20, recycling_steps: int = 0, seed: int = 1234,
                 out_dir: str | None = None, write_structures: bool = True, plots: bool = True) -> None:
        self.samples = check_int("diffusion_samples", diffusion_samples, 1)
        self.sampling_steps = check_int("sampling_steps", sampling_steps, 1)
        self.recycling_steps = check_int("recycling_steps", recycling_steps, 0)
        self.seed = int(seed)
        self.out_dir = None if out_dir is None else Path(out_dir)
        self.write_structures, self.plots = bool(write_structures), bool(plots)
        mols = CCDMolecules()
        self.targets = load_targets(list(paths), mols, ids)
        self.batches = []
        for target in self.targets:
            feats = featurize(target, mols, seed=self.seed, max_tokens=max_tokens, training=False)
            self.batches.append(split_batch(feats, {"pdb_id": target.id}))
        self.calls = 0
        self.first_per_residue: dict[str, dict[str, torch.Tensor]] = {}
        self.label: str | None = None  # legend name of the next evaluation's line (None: by its number)

    def evaluate(self, policy: Any) -> tuple[dict[str, float], dict[str, dict[str, torch.Tensor]]]:
        """Metrics (means over samples and targets, and per target) and each target's raw outputs."""
        from boltz.model.loss.distogramv2 import distogram_loss

        from boltz_ft.metrics import structure_metrics

        sums: dict[str, list[float]] = {}
        raw: dict[str, dict[str, torch.Tensor]] = {}
        for index, batch in enumerate(self.batches):
            target = batch["meta"]["pdb_id"]
            with torch.random.fork_rng():
                torch.manual_seed(self.seed + index)
                out = policy.predict(batch, self.samples, self.sampling_steps, self.recycling_steps)
            feats = {**batch["inputs"], **batch["targets"]}
            scores = structure_metrics(out["coords"].cpu(), feats)
            ce, _ = distogram_loss({"pdistogram": out["pdistogram"].cpu()}, feats)
            scores["distogram_ce"] = ce.reshape(1)
            for key, values in scores.items():
                value = float(torch.nanmean(values.float()))
                sums.setdefault(key, []).append(value)
                sums.setdefault(f"{target}/{key}", []).append(value)
            raw[target] = {"coords": out["coords"].cpu(), **{k: v.cpu() for k, v in scores.items()}}
        metrics = {key: sum(v) / len(v) for key, v in sums.items() if all(math.isfinite(x) for x in v)}
        return metrics, raw

    def __call__(self, policy: Any) -> dict[str, float]:
        metrics, raw = self.evaluate(policy)
        self.calls += 1
        out_dir = self.out_dir or _run_dir()
        if out_dir is not None and (self.write_structures or self.plots):
            self.write(out_dir / "predictions", raw)
        return metrics

    def write(self, directory: Path, raw: dict[str, dict[str, torch.Tensor]]) -> list[Path]:
        """mmCIF / PDB files of every sample and the PNGs of the first sample per target."""
        from boltz_ft.metrics import ca_coords, per_residue_lddt
        from boltz_ft.plots import plot_distance_maps, plot_per_residue_lddt
        from boltz_ft.writer import write_features

        directory.mkdir(parents=True, exist_ok=True)
        written = []
        for batch in self.batches:
            target = batch["meta"]["pdb_id"]
            feats = {k: v[0] for k, v in {**batch["inputs"], **batch["targets"]}.items()}
            coords = raw[target]["coords"]
            if self.write_structures:
                for k in range(coords.shape[0]):
                    for fmt in ("cif", "pdb"):
                        written.append(write_features(feats, coords[k], directory / f"{target}_sample{k}.{fmt}", fmt))
            if self.plots:
                centre = feats["token_to_center_atom"].float()
                mask = feats["token_pad_mask"].bool()
                pred_ca = ca_coords(coords[:1], centre)[0][mask]
                true_ca = ca_coords(feats["coords"][:1], centre)[0][mask]
                written.append(plot_distance_maps(pred_ca, true_ca, directory / f"{target}_distance_map.png",
                                                  f"{target}: sample 0 vs truth (Cα distances)"))
                all_ca = ca_coords(coords, centre)[:, mask]
                per_res = torch.nanmean(per_residue_lddt(all_ca, true_ca, torch.ones(len(true_ca), dtype=torch.bool)), 0)
                # The first evaluation of a fresh run is the starting model (iteration -1); later plots show it
                # beside the current one. A resumed run's first evaluation is the resumed model (not persisted).
                name = self.label or ("first evaluation" if self.calls == 1 else f"evaluation {self.calls}")
                lines = self.first_per_residue.setdefault(target, {name: per_res})
                lines = {**lines, name: per_res} if self.calls > 1 else lines
                written.append(plot_per_residue_lddt(lines, directory / f"{target}_lddt.png",
                                                     f"{target}: per-residue Cα-lDDT, mean over samples"))
        return written
