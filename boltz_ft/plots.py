"""Evaluation figures (matplotlib, Agg backend): Cα distance maps and per-residue lDDT profiles.

Distance maps show where a prediction's geometry departs from the target (domain shifts appear as blocks in the
difference panel); per-residue lDDT curves compare models (e.g. base vs SFT vs GRPO) along the sequence.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import matplotlib

matplotlib.use("Agg")  # headless: figures go to files only

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

__all__ = ["plot_distance_maps", "plot_per_residue_lddt"]


def _numpy(x: Tensor | np.ndarray) -> np.ndarray:
    return x.detach().cpu().double().numpy() if torch.is_tensor(x) else np.asarray(x, dtype=np.float64)


def _distances(ca: np.ndarray) -> np.ndarray:
    """``[N,3] -> [N,N]`` Euclidean distances."""
    return np.linalg.norm(ca[:, None, :] - ca[None, :, :], axis=-1)


def plot_distance_maps(pred_ca: Tensor | np.ndarray, true_ca: Tensor | np.ndarray, path: str | Path,
                       title: str = "", mask: Tensor | np.ndarray | None = None, dpi: int = 120) -> Path:
    """Predicted and true Cα distance maps side by side, plus their difference (pred − true); returns the path.

    Args:
        pred_ca, true_ca: ``[N,3]`` centre-atom coordinates (e.g. :func:`boltz_ft.metrics.ca_coords`).
        path: output image (PNG by suffix). title: figure title.
        mask: ``[N]`` residues to show (e.g. resolved, non-padding); others are dropped.
    """
    pred, true = _numpy(pred_ca).reshape(-1, 3), _numpy(true_ca).reshape(-1, 3)
    if pred.shape != true.shape:
        raise ValueError(f"pred_ca {pred.shape} and true_ca {true.shape} differ")
    if mask is not None:
        keep = _numpy(mask).astype(bool)
        pred, true = pred[keep], true[keep]
    d_pred, d_true = _distances(pred), _distances(true)
    diff = d_pred - d_true
    vmax = float(max(d_pred.max(initial=0.0), d_true.max(initial=0.0), 1e-6))
    lim = float(max(np.abs(diff).max(initial=0.0), 1e-6))

    fig, axes = plt.subplots(1, 3, figsize=(15, 5.0), layout="constrained")
    for ax, data, label in ((axes[0], d_pred, "predicted"), (axes[1], d_true, "true")):
        image = ax.imshow(data, cmap="viridis_r", vmin=0.0, vmax=vmax, origin="upper")
        ax.set_title(f"{label} Cα distances")
        ax.set_xlabel("residue")
        ax.set_ylabel("residue")
    fig.colorbar(image, ax=axes[:2], label="Å", shrink=0.85)
    image = axes[2].imshow(diff, cmap="RdBu_r", vmin=-lim, vmax=lim, origin="upper")
    axes[2].set_title("predicted − true")
    axes[2].set_xlabel("residue")
    fig.colorbar(image, ax=axes[2], label="Å", shrink=0.85)
    if title:
        fig.suptitle(title, fontsize="large")
    return _save(fig, path, dpi)


def plot_per_residue_lddt(per_res: Mapping[str, Tensor | np.ndarray], path: str | Path, title: str = "",
                          residue_numbers: Tensor | np.ndarray | None = None, dpi: int = 120) -> Path:
    """Per-residue lDDT along the sequence, one line per model (NaN gaps stay gaps); returns the path.

    Args:
        per_res: label -> ``[N]`` per-residue lDDT (e.g. ``per_residue_lddt(...)[0]``); all the same N.
        path: output image. title: figure title (the legend shows each model's mean).
        residue_numbers: ``[N]`` x-axis values (e.g. ``residue_index + 1``); 1..N by default.
    """
    if not per_res:
        raise ValueError("per_res is empty: nothing to plot")
    curves = {label: _numpy(values).reshape(-1) for label, values in per_res.items()}
    lengths = {len(v) for v in curves.values()}
    if len(lengths) != 1:
        raise ValueError(f"per-residue curves have different lengths {sorted(lengths)}")
    n = lengths.pop()
    x = np.arange(1, n + 1) if residue_numbers is None else _numpy(residue_numbers).reshape(-1)

    fig, ax = plt.subplots(figsize=(max(6.0, min(18.0, n / 12)), 3.8), constrained_layout=True)
    for label, values in curves.items():
        mean = np.nanmean(values) if np.isfinite(values).any() else float("nan")
        ax.plot(x, values, marker=".", linewidth=1.2, label=f"{label} (mean {mean:.3f})")
    ax.set_ylim(0.0, 1.02)
    ax.set_xlabel("residue")
    ax.set_ylabel("lDDT")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize="small")
    if title:
        ax.set_title(title)
    return _save(fig, path, dpi)


def _save(fig: plt.Figure, path: str | Path, dpi: int) -> Path:
    """Save and close (figures are not kept open across many evaluation targets)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(path, dpi=dpi)
    finally:
        plt.close(fig)
    return path
