"""Boltz-2's SFT objective: initial values at boltz.md §1.6's sanity bounds, weights, gradients, no mutation."""

import math

import pytest
import torch

from boltz_ft.sft import Boltz2SFT
from elign.engine.errors import ConfigError


def _batch(features):
    return {k: v.unsqueeze(0) for k, v in features.items() if torch.is_tensor(v)}


def test_initial_losses_match_the_sanity_values(tiny_boltz2, crambin_features):
    torch.manual_seed(0)
    sft = Boltz2SFT(tiny_boltz2.train(), diffusion_multiplicity=4, confidence_samples=2, sampling_steps=4)
    batch = _batch(crambin_features)
    before = {k: v.clone() for k, v in batch.items()}
    out = sft(batch)
    # A random model predicts a near-uniform distogram over 64 bins: CE ~ ln 64 = 4.16 (§1.6: 4.2).
    assert abs(float(out["distogram"]) - math.log(64)) < 0.15
    assert 0.5 < float(out["smooth_lddt"]) < 1.0  # §1.6: 0.84 (1 - mean of soft pair scores)
    assert 0.05 < float(out["mse"]) < 3.0  # §1.6: 0.95 (lambda-weighted aligned MSE of a random denoiser)
    # Confidence CEs near the log of their bin counts (pLDDT 50 bins, PDE 64, resolved 2).
    assert abs(float(out["confidence_plddt"]) - math.log(50)) < 1.0
    assert abs(float(out["confidence_pde"]) - math.log(64)) < 1.0
    assert 0.2 < float(out["confidence_resolved"]) < 1.5
    expected = 4.0 * out["diffusion"] + 0.03 * out["distogram"] + 1e-4 * out["confidence"]
    assert torch.allclose(out["loss"].detach(), expected, rtol=1e-6)
    assert out["diffusion"] == pytest.approx(float(out["mse"] + out["smooth_lddt"]), rel=1e-6)
    assert all(torch.equal(batch[k], before[k]) for k in before)  # the caller's features stay as they were
    out["loss"].backward()
    grads = [p.grad for p in tiny_boltz2.parameters() if p.requires_grad]
    assert all(g is None or torch.isfinite(g).all() for g in grads)
    assert tiny_boltz2.distogram_module.distogram.weight.grad.abs().sum() > 0


def test_weights_scale_their_terms(tiny_boltz2, crambin_features):
    batch = _batch(crambin_features)
    only_distogram = Boltz2SFT(tiny_boltz2, diffusion_weight=0.0, distogram_weight=1.0)
    out = only_distogram(batch)
    assert torch.allclose(out["loss"].detach(), out["distogram"])
    assert "confidence" not in out


def test_bad_values_name_their_key(tiny_boltz2):
    with pytest.raises(ConfigError, match="diffusion_multiplicity"):
        Boltz2SFT(tiny_boltz2, diffusion_multiplicity=0)
    with pytest.raises(ConfigError, match="distogram_weight"):
        Boltz2SFT(tiny_boltz2, distogram_weight=-1.0)
