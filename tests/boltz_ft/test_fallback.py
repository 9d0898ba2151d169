"""FallbackBoltz: boltz's feature dict and core interface, EDM preconditioning and sampler, SFT / LoRA / run.py."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from boltz_ft.core import Trunk
from boltz_ft.data import split_batch
from boltz_ft.fallback import FallbackBoltz, random_rotations
from boltz_ft.losses import weighted_kabsch_align
from boltz_ft.sft import Boltz2SFT
from elign.engine.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def _batch(features, copies=1):
    return {k: torch.stack([v] * copies) for k, v in features.items() if torch.is_tensor(v)}


def _rmsd_after_kabsch(x, y):
    ones = torch.ones(x.shape[:2])
    return float(((weighted_kabsch_align(y, x, ones, ones) - x) ** 2).sum(-1).mean().sqrt())


def test_trunk_and_sample_shapes(crambin_features):
    model = FallbackBoltz(seed=0)
    assert 50_000 <= sum(p.numel() for p in model.parameters()) <= 200_000
    assert model.confidence_prediction is False
    feats = _batch(crambin_features, copies=2)
    n, m = feats["res_type"].shape[1], feats["ref_pos"].shape[1]
    trunk = model.trunk(feats, recycling_steps=1, grad=False)
    assert isinstance(trunk, Trunk)
    assert trunk.s.shape == trunk.s_inputs.shape == (2, n, 32) and trunk.z.shape == (2, n, n, 16)
    assert trunk.pdistogram.shape == (2, n, n, 1, 64)
    assert torch.allclose(trunk.pdistogram, trunk.pdistogram.transpose(1, 2))  # symmetrised, as boltz's
    assert not trunk.s.requires_grad
    torch.manual_seed(0)
    coords = model.sample(trunk, feats, num_sampling_steps=4, diffusion_samples=3)
    assert coords.shape == (6, m, 3) and torch.isfinite(coords).all()
    with pytest.raises(NotImplementedError, match="confidence head"):
        model.confidence(trunk, feats, coords, 3)
    with pytest.raises(ConfigError, match="confidence_samples"):
        Boltz2SFT(model, confidence_samples=1)


def test_preconditioning_is_boltzs(crambin_features):
    """D(x, σ) = c_skip·x + c_out·F(c_in·x, c_noise) with boltz's coefficients (network stubbed)."""
    model = FallbackBoltz(seed=0)
    feats = _batch(crambin_features)
    trunk = model.trunk(feats, grad=False)
    seen = {}

    def network(r_noisy, c_noise, *args):
        seen.update(r=r_noisy, c_noise=c_noise)
        return torch.ones_like(r_noisy)

    model.denoiser.forward = network
    x = torch.randn(2, feats["ref_pos"].shape[1], 3) * 30
    sigma, sd = torch.tensor([4.0, 40.0]), 16.0
    out = model.denoise(trunk, feats, x, sigma, multiplicity=2)
    s = sigma[:, None, None]
    assert torch.allclose(seen["r"], x / torch.sqrt(s ** 2 + sd ** 2))
    assert torch.allclose(seen["c_noise"], torch.log(sigma / sd) / 4)
    assert torch.allclose(out, sd ** 2 / (s ** 2 + sd ** 2) * x + s * sd / torch.sqrt(s ** 2 + sd ** 2), atol=1e-5)


def test_training_noise_is_synchronised_and_the_truth_rigidly_augmented(crambin_features):
    model = FallbackBoltz(seed=0)
    feats = _batch(crambin_features, copies=2)
    trunk = model.trunk(feats, grad=False)
    seen = {}

    def denoise(trunk, feats, x_noisy, sigma, multiplicity):
        seen.update(sigma=sigma, x=x_noisy)
        return x_noisy

    model.denoise = denoise
    torch.manual_seed(0)
    loss, parts = model.diffusion_loss(trunk, feats, multiplicity=3, per_structure=True)
    assert loss.shape == parts["mse_loss"].shape == parts["smooth_lddt_loss"].shape == (6,)
    assert seen["sigma"].view(2, 3).unique(dim=1).shape == (2, 1) and (seen["sigma"] > 0).all()
    model.diffusion_args["synchronize_sigmas"] = False
    model.diffusion_loss(trunk, feats, multiplicity=3)
    assert len(seen["sigma"].unique()) == 6
    # At a negligible noise level the network sees the truth centred, rotated and translated: same distances,
    # not the same coordinates.
    model.diffusion_args.update(P_mean=-30.0, P_std=0.0)
    model.diffusion_loss(trunk, feats, multiplicity=3)
    truth = feats["coords"][0, 0]
    dist = lambda x: torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist")  # noqa: E731 (exact)
    for x in seen["x"]:
        assert torch.allclose(dist(x), dist(truth), atol=1e-3)
        assert not torch.allclose(x, truth - truth.mean(0), atol=1e-1)
    rotation = random_rotations(64)
    assert torch.allclose(rotation @ rotation.transpose(1, 2), torch.eye(3).expand(64, 3, 3), atol=1e-5)
    assert torch.allclose(torch.det(rotation), torch.ones(64), atol=1e-5)


def test_sampler_with_a_perfect_denoiser_returns_the_truth(crambin_features):
    """boltz's schedule (first level σ_max·σ_d, last 0) and update rule land on D's output up to a rigid motion."""
    model = FallbackBoltz(seed=0)
    schedule = model.sample_schedule(20)
    assert schedule[0] == pytest.approx(2560.0) and schedule[-1] == 0 and len(schedule) == 21
    assert int((schedule[1:] > 1.0).sum()) == 14  # stochastic steps (γ > 0), boltz.md §5.1
    feats = _batch(crambin_features)
    truth = feats["coords"][:, 0]
    truth = truth - truth.mean(1, keepdim=True)
    model.denoise = lambda trunk, feats, x, sigma, m: truth.expand_as(x)
    torch.manual_seed(0)
    coords = model.sample(model.trunk(feats, grad=False), feats, num_sampling_steps=20, diffusion_samples=2)
    assert all(_rmsd_after_kabsch(coords[i:i + 1], truth) < 1e-2 for i in range(2))


def test_sft_loss_has_gradients_for_every_parameter(crambin_features):
    model = FallbackBoltz(seed=0).train()
    torch.manual_seed(0)
    out = Boltz2SFT(model, diffusion_multiplicity=2)(_batch(crambin_features), recycling_steps=1)
    assert abs(float(out["distogram"]) - math.log(64)) < 0.3  # near-uniform distogram at init
    assert 0 < float(out["smooth_lddt"]) < 1 and 0 < float(out["mse"]) < 5
    assert torch.isfinite(out["loss"]) and out["diffusion"] == pytest.approx(float(out["mse"] + out["smooth_lddt"]))
    out["loss"].backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    missing = [n for n, p in trainable if p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0]
    # 1crn has no token bonds (boltz's token_bonds feature is all zero for a plain polymer): a zero gradient there.
    assert float(crambin_features["token_bonds"].abs().sum()) == 0
    assert missing == ["token_bonds.weight"], missing
    assert model.denoiser.coords_out.weight.abs().sum() > 0  # the output layer is not zero-initialised
    # The diffusion loss alone reaches every weight but the distogram head's, the trunk's included.
    model.zero_grad(set_to_none=True)
    loss, parts = model.diffusion_loss(model.trunk(_batch(crambin_features), recycling_steps=1),
                                       _batch(crambin_features), multiplicity=2)
    assert torch.isfinite(loss) and set(parts) == {"mse_loss", "smooth_lddt_loss"}
    loss.backward()
    reached = {n for n, p in trainable if p.grad is not None and p.grad.abs().sum() > 0}
    assert {n for n, _ in trainable} - reached == {"token_bonds.weight", "distogram.weight", "distogram.bias"}


def test_overfits_one_crop(crambin_features):
    """30 Adam steps on one crop with the same noise draws each step (a fixed objective) lower the SFT loss."""
    model = FallbackBoltz(seed=0).train()
    sft = Boltz2SFT(model, diffusion_multiplicity=2)
    batch = _batch(crambin_features)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(30):
        torch.manual_seed(0)
        out = sft(batch)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        losses.append(float(out["loss"].detach()))
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.9 * first, losses


def test_lora_policy_from_the_fallback_config(crambin_features):
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=boltz/sft_lora", "model=boltz/fallback", "seed=0"])
    policy = instantiate(cfg.model, _convert_="partial")
    assert isinstance(policy.model, FallbackBoltz)
    assert any(n.startswith("trunk_mlp.") for n in policy.adapted)
    assert any(n.startswith("denoiser.") for n in policy.adapted)
    batch = split_batch(crambin_features, {"pdb_id": "1crn"})
    loss, _ = policy.supervised_loss(batch)
    loss.backward()
    grads = {n: p.grad for n, p in policy.trainable_parameters()}
    assert all(n.endswith((".lora_A", ".lora_B")) for n in grads)
    for part in ("model.trunk_mlp.", "model.denoiser.", "model.distogram."):  # every adapted part learns at step 0
        assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.startswith(part)
                   and n.endswith("lora_B")), part
    out = policy.predict(batch, diffusion_samples=2, sampling_steps=3)
    assert out["coords"].shape == (2, crambin_features["ref_pos"].shape[0], 3)
    assert out["pdistogram"].shape[-1] == 64


def test_modules_import_without_boltz():
    code = ("import sys; sys.modules['boltz'] = None\n"
            "import boltz_ft.losses, boltz_ft.fallback, boltz_ft.sft\n"
            "m = boltz_ft.fallback.FallbackBoltz(seed=0)\n"
            "assert not any(k == 'boltz' or k.startswith('boltz.') for k, v in sys.modules.items() if v is not None)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.slow  # a run.py job with evaluation, ~80 s on 2 cores; the recipe's own end-to-end test covers run.py
def test_run_py_trains_and_evaluates_the_fallback(tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "run.py", "experiment=boltz/sft_lora", "model=boltz/fallback", "trainer.max_iterations=2",
           "trainer.eval_interval=2", "evaluator.diffusion_samples=2", "evaluator.sampling_steps=3",
           "evaluator.write_structures=false", "evaluator.plots=false", f"hydra.run.dir={run_dir}"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert sum("train/loss" in r for r in records) == 2
    assert any(math.isfinite(r.get("eval/ca_lddt", math.nan)) for r in records)
