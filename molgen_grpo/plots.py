"""Pictures of a conformer evaluation: COV-R / COV-P against the threshold for several models, and
generated conformers drawn next to the reference they are nearest to (aligned, same projection)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from rdkit import Chem
from rdkit.Chem import rdMolAlign

from molgen_grpo.coverage import decode_conformer
from molgen_grpo.evaluate import QM9_THRESHOLD, TestMolecule

__all__ = ["draw_nearest", "nearest_pair", "plot_coverage", "projection"]

ELEMENT_COLOURS = {"C": "#404040", "N": "#3050f8", "O": "#ff0d0d", "F": "#90e050", "S": "#c8a000", "Cl": "#1ff01f"}
OTHER_COLOUR = "#ff1493"


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_coverage(summaries: Sequence[Mapping[str, Any]], labels: Sequence[str], out: str | Path) -> Path:
    """COV-R (left) and COV-P (right), mean over molecules, against the threshold, one line per model;
    dotted lines mark the QM9 (0.5 Å) and GEOM-Drugs (0.75 Å) thresholds."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for summary, label in zip(summaries, labels):
        t = np.asarray(summary["thresholds"])
        for ax, key in zip(axes, ("cov_r_mean", "cov_p_mean")):
            ax.plot(t, np.asarray(summary[key]), label=f"{label} (MAT-R {summary['mat_r_mean']:.2f} Å)"
                    if key == "cov_r_mean" else label)
    for ax, name in zip(axes, ("COV-R (recall)", "COV-P (precision)")):
        for at in (QM9_THRESHOLD, 0.75):
            ax.axvline(at, color="grey", linestyle=":", linewidth=1)
        ax.set(xlabel="threshold (Å)", title=name, xlim=(0, 3), ylim=(0, 1.02))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mean coverage over molecules")
    axes[0].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def nearest_pair(result: Mapping[str, Any]) -> tuple[int, int, float] | None:
    """``(reference, generated, RMSD)`` of the closest pair in one molecule's scores, or None when
    no completion was valid."""
    pairs = [(i, j, rmsd) for i, (j, rmsd) in enumerate(result["nearest"]) if rmsd is not None]
    return min(pairs, key=lambda p: p[2]) if pairs else None


def projection(coords: np.ndarray) -> np.ndarray:
    """``[3, 2]``: the two principal axes of ``coords [N, 3]``, so a flat drawing shows the most of it."""
    centred = coords - coords.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    return vt[:2].T


def _draw(ax: Any, mol: Chem.Mol, centre: np.ndarray, axes: np.ndarray, title: str) -> None:
    xy = (mol.GetConformer().GetPositions() - centre) @ axes
    for bond in mol.GetBonds():
        a, b = bond.GetBeginAtomIdx(), bond.GetEndAtomIdx()
        ax.plot(xy[[a, b], 0], xy[[a, b], 1], color="#999999", linewidth=2, zorder=1)
    colours = [ELEMENT_COLOURS.get(atom.GetSymbol(), OTHER_COLOUR) for atom in mol.GetAtoms()]
    ax.scatter(xy[:, 0], xy[:, 1], c=colours, s=60, zorder=2, edgecolors="white", linewidths=0.5)
    ax.set_title(title, fontsize=8)
    ax.set_aspect("equal")
    ax.axis("off")


def draw_nearest(samples: Sequence[Mapping[str, Any]], results: Sequence[Mapping[str, Any]],
                 molecules: Mapping[str, TestMolecule], out: str | Path, count: int = 8) -> Path:
    """For up to ``count`` molecules (those with a valid completion, in order), the generated conformer
    nearest to a reference, aligned onto it, beside that reference, both projected on the reference's
    principal axes. ``samples`` and ``results`` are the molecule lists of a samples file and of its
    evaluation; ``molecules`` maps SMILES to the references."""
    rows = []
    for entry, result in zip(samples, results):
        pair = nearest_pair(result)
        if pair is not None:
            rows.append((entry, pair))
        if len(rows) == count:
            break
    if not rows:
        raise ValueError("no molecule has a valid generated conformer: nothing to draw")
    plt = _pyplot()
    fig, axes = plt.subplots(len(rows), 2, figsize=(6, 2.6 * len(rows)), squeeze=False)
    for (entry, (i, j, rmsd)), (left, right) in zip(rows, axes):
        ref = Chem.RemoveHs(molecules[entry["smiles"]].references[i])
        gen = Chem.RemoveHs(decode_conformer(entry["completions"][j]))
        rdMolAlign.GetBestRMS(gen, ref)  # moves gen onto ref, so both share one frame
        coords = ref.GetConformer().GetPositions()
        centre, axes2 = coords.mean(axis=0), projection(coords)
        _draw(left, gen, centre, axes2, f"generated #{j}: {rmsd:.2f} Å to reference #{i}")
        _draw(right, ref, centre, axes2, f"reference #{i}: {entry['smiles'][:32]}")
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
