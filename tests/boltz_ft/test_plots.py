"""Evaluation figures (boltz_ft.plots) write non-empty PNG files."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from boltz_ft.metrics import ca_coords, per_residue_lddt
from boltz_ft.plots import plot_distance_maps, plot_per_residue_lddt

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def is_png(path) -> bool:
    return path.is_file() and path.stat().st_size > 1000 and path.read_bytes()[:8] == PNG_MAGIC


def trace(n: int = 24, seed: int = 0) -> torch.Tensor:
    steps = torch.randn(n, 3, generator=torch.Generator().manual_seed(seed))
    return torch.cumsum(3.8 * steps / steps.norm(dim=-1, keepdim=True), 0)


def test_plot_distance_maps_writes_png(tmp_path):
    true = trace()
    pred = true + 0.8 * torch.randn(true.shape, generator=torch.Generator().manual_seed(1))
    path = plot_distance_maps(pred, true, tmp_path / "maps" / "dist.png", title="test target")
    assert path == tmp_path / "maps" / "dist.png" and is_png(path)
    masked = plot_distance_maps(pred.numpy(), true.numpy(), tmp_path / "masked.png", mask=torch.arange(24) < 20)
    assert is_png(masked)
    with pytest.raises(ValueError):
        plot_distance_maps(pred[:5], true, tmp_path / "bad.png")


def test_plot_per_residue_lddt_writes_png_with_nan_gaps(tmp_path):
    true = trace()
    mask = torch.ones(24, dtype=torch.bool)
    mask[5] = False
    noisy = true + torch.tensor([0.5, 2.0])[:, None, None] * torch.randn(2, 24, 3, generator=torch.Generator())
    per = per_residue_lddt(noisy, true, mask)
    assert per[:, 5].isnan().all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no RuntimeWarning from NaN handling
        path = plot_per_residue_lddt({"base": per[0], "sft": per[1].numpy()}, tmp_path / "lddt.png",
                                     title="1crn", residue_numbers=np.arange(24) + 1)
    assert is_png(path)
    assert is_png(plot_per_residue_lddt({"all nan": torch.full((4,), float("nan"))}, tmp_path / "nan.png"))
    with pytest.raises(ValueError):
        plot_per_residue_lddt({"a": per[0], "b": per[1, :10]}, tmp_path / "bad.png")
    with pytest.raises(ValueError):
        plot_per_residue_lddt({}, tmp_path / "empty.png")


def test_plots_on_crambin_features(crambin_features, tmp_path):
    f = crambin_features
    true_ca = ca_coords(f["coords"], f["token_to_center_atom"])[0]
    pred_ca = true_ca + 1.0 * torch.randn(true_ca.shape, generator=torch.Generator().manual_seed(2))
    assert is_png(plot_distance_maps(pred_ca, true_ca, tmp_path / "crambin.png", title="1crn crop",
                                     mask=f["token_pad_mask"]))
