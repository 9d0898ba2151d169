"""Boltz2Core re-composes the official forward exactly, and never mutates the caller's features."""

import torch

from boltz_ft.core import Boltz2Core


def _batch(features):
    return {k: v.unsqueeze(0) for k, v in features.items() if torch.is_tensor(v)}


def test_trunk_sampler_and_confidence_equal_the_official_forward(tiny_boltz2, crambin_features):
    model, batch = tiny_boltz2.eval(), _batch(crambin_features)
    core = Boltz2Core(model)
    with torch.no_grad():
        torch.manual_seed(0)
        reference = model(dict(batch), recycling_steps=1, num_sampling_steps=4, diffusion_samples=2)
        torch.manual_seed(0)
        trunk = core.trunk(batch, recycling_steps=1)
        coords = core.sample(trunk, batch, 4, 2)
        confidence = core.confidence(trunk, batch, coords, 2)
    # Same sub-modules in the same order and the same RNG draws: bitwise equal.
    assert torch.equal(reference["pdistogram"], trunk.pdistogram)
    assert torch.equal(reference["s"], trunk.s) and torch.equal(reference["z"], trunk.z)
    assert torch.equal(reference["sample_atom_coords"], coords)
    assert torch.equal(reference["plddt"], confidence["plddt"]) and torch.equal(reference["ptm"], confidence["ptm"])


def test_diffusion_loss_keeps_the_callers_coords_and_has_gradients(tiny_boltz2, crambin_features):
    batch = _batch(crambin_features)
    coords = batch["coords"].clone()
    core = Boltz2Core(tiny_boltz2.train())
    trunk = core.trunk(batch)
    loss, parts = core.diffusion_loss(trunk, batch, multiplicity=3)
    assert torch.equal(batch["coords"], coords)  # boltz's own forward would have reshaped it to [3, M, 3]
    assert set(parts) == {"mse_loss", "smooth_lddt_loss"}
    loss.backward()
    score = tiny_boltz2.structure_module.score_model
    assert all(p.grad is not None for p in score.token_transformer.parameters())
    # Gradients reach the trunk through the conditioning.
    assert tiny_boltz2.pairformer_module.layers[0].attention.proj_q.weight.grad is not None


def test_detached_trunk_stops_gradients_at_the_trunk(tiny_boltz2, crambin_features):
    batch = _batch(crambin_features)
    core = Boltz2Core(tiny_boltz2.train())
    trunk = core.trunk(batch).detached()
    loss, _ = core.diffusion_loss(trunk, batch, multiplicity=2)
    loss.backward()
    assert tiny_boltz2.pairformer_module.layers[0].attention.proj_q.weight.grad is None
    assert tiny_boltz2.structure_module.score_model.token_transformer.layers[0].pair_bias_attn.proj_q.weight.grad \
        is not None


def test_only_the_last_recycle_keeps_gradients(tiny_boltz2, crambin_features):
    batch = _batch(crambin_features)
    core = Boltz2Core(tiny_boltz2.train())
    trunk = core.trunk(batch, recycling_steps=2)
    assert trunk.z.requires_grad
    assert not Boltz2Core(tiny_boltz2).trunk(batch, grad=False).z.requires_grad
