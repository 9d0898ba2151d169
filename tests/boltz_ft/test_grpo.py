"""GRPO over Boltz-2's sampler: boltz's own samples, exact Gaussian log-probs, the LoRA-scale-0 reference."""

import pytest
import torch
from omegaconf import OmegaConf

from boltz_ft.backend import build_boltz2
from boltz_ft.core import Boltz2Core
from boltz_ft.grpo import BoltzSamplerPolicy, StructurePrompts
from boltz_ft.sampler import gaussian_log_prob, sample_trajectory, sampler_schedule
from elign.engine.errors import ConfigError

from conftest import POLICY_CONFIG, tiny_backend_arguments

CONFIG = OmegaConf.load(POLICY_CONFIG)
SCORE_MODEL = ["structure_module.score_model.*"]


def _batch(features):
    return {k: v.unsqueeze(0) for k, v in features.items() if torch.is_tensor(v)}


def _perturbed_model():
    """The tiny Boltz2 with its zero-initialised output chain perturbed, so the denoiser is not c_skip * x."""
    model = build_boltz2(**tiny_backend_arguments(0)).eval()
    with torch.no_grad():
        generator = torch.Generator().manual_seed(0)
        for p in model.structure_module.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=generator))
    return model


def test_schedule_matches_the_spec():
    schedule = sampler_schedule(build_boltz2(**tiny_backend_arguments(0)).structure_module, 20)
    assert schedule.sigma[0] == pytest.approx(16 * 160.0, rel=1e-5) and schedule.sigma[-1] == 0
    # gamma 0.8 while the next sigma exceeds 1 Angstrom: 14 of the 20 steps are stochastic (boltz.md §5.1).
    assert int((schedule.var > 0).sum()) == 14 and int(schedule.trained.sum()) == 13
    assert torch.allclose(schedule.var.sqrt()[:14], 1.003 * (schedule.t_hat[:14] ** 2
                                                             - schedule.sigma[:14] ** 2).sqrt(), rtol=1e-6)


def test_sampler_reproduces_boltz_sampler_bitwise(crambin_features):
    model, batch = _perturbed_model(), _batch(crambin_features)
    core = Boltz2Core(model)
    with torch.no_grad():
        trunk = core.trunk(batch)
        torch.manual_seed(3)
        reference = core.sample(trunk, batch, 8, 3)
        torch.manual_seed(3)
        trajectory = sample_trajectory(lambda x, t: core.denoise(trunk, batch, x, t, 3),
                                       sampler_schedule(model.structure_module, 8), batch["atom_pad_mask"][0], 3)
    assert torch.equal(trajectory.coords, reference)
    assert trajectory.noisy.shape == (3, 8, reference.shape[1], 3) and trajectory.logp.shape == (3, 7)


def test_shared_steps_branch_one_trajectory(crambin_features):
    model, batch = _perturbed_model(), _batch(crambin_features)
    core = Boltz2Core(model)
    with torch.no_grad():
        trunk = core.trunk(batch)
        torch.manual_seed(5)
        traj = sample_trajectory(lambda x, t: core.denoise(trunk, batch, x, t, x.shape[0]),
                                 sampler_schedule(model.structure_module, 8), batch["atom_pad_mask"][0], 3,
                                 shared_steps=4)
    # x̃_0 .. x̃_3 (and their augmentations) are one trajectory's; the samples part at x̃_4.
    assert torch.equal(traj.noisy[0, :4], traj.noisy[2, :4])
    assert torch.equal(traj.rotations[1, :4], traj.rotations[0, :4])
    assert not torch.equal(traj.noisy[0, 4], traj.noisy[1, 4]) and not torch.equal(traj.coords[0], traj.coords[1])


def test_gaussian_log_prob_hand_case():
    x, mean = torch.zeros(1, 2, 3), torch.zeros(1, 2, 3)
    x[0, 0, 0] = 2.0
    mask = torch.tensor([[1.0, 0.0]])  # the second atom is padding
    value = gaussian_log_prob(x, mean, torch.tensor([4.0]), mask)
    # one atom, 3 dims: -(2^2)/(2*4) - 3 * 0.5 * log(2 pi 4)
    assert float(value) == pytest.approx(-0.5 - 1.5 * torch.log(torch.tensor(8 * torch.pi)).item(), rel=1e-6)


@pytest.fixture(scope="module")
def rollout_and_policy():
    lora = {**dict(CONFIG.lora), "target_modules": SCORE_MODEL}
    policy = BoltzSamplerPolicy(backend=_perturbed_model(), sft=dict(CONFIG.sft), lora=lora, sampling_steps=8, seed=0)
    prompts = StructurePrompts(group_size=3, batch_size=6, paths=["package:boltz_ft/data/pdb"], max_tokens=24, seed=0)
    torch.manual_seed(0)
    return policy, policy.rollout(next(prompts), 3)


def test_rollout_layout_and_one_trunk_per_target(rollout_and_policy):
    policy, rollout = rollout_and_policy
    assert rollout.batch_size == 6 and rollout.group_ids.tolist() == [0, 0, 0, 1, 1, 1]
    assert rollout.info["metrics"]["rollout/trunk_passes"] == 2.0 and not policy.trunk_trainable
    m = rollout.group_payload["feat/atom_pad_mask"].shape[1]
    assert rollout.payload["coords"].shape == (6, m, 3) and rollout.payload["noisy"].shape == (6, 8, m, 3)
    assert rollout.step_mask[0].tolist() == policy.schedule.trained.tolist()


def test_recomputed_log_probs_equal_the_rollouts_and_the_reference_is_the_base(rollout_and_policy):
    policy, rollout = rollout_and_policy
    steps = torch.arange(rollout.num_steps)
    out = policy.log_prob(rollout, steps, with_reference=True)
    mask = rollout.step_mask
    # Same weights, same recorded states: equal up to float32 rounding of ~1e4-sized log-densities.
    assert torch.allclose(out.logp[mask], rollout.logp_old[mask], rtol=1e-6)
    # B = 0 at initialisation: the adapted model is the base, so the closed-form KL is 0.
    assert torch.allclose(out.gaussian_kl()[mask], torch.zeros(()), atol=1e-6)
    with torch.no_grad():
        for name, p in policy.trainable_parameters():
            p.normal_(0, 0.02)
    moved = policy.log_prob(rollout, steps, with_reference=True)
    kl = moved.gaussian_kl()[mask]
    assert (kl > 0).all() and torch.allclose(moved.ref_logp[mask], rollout.logp_old[mask], rtol=1e-6)
    moved.logp[mask].sum().backward()
    grads = [p.grad for _, p in policy.trainable_parameters()]
    assert all(g is None or torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads if g is not None) > 0


def test_max_action_noise_trains_the_late_actions_only(rollout_and_policy):
    policy, rollout = rollout_and_policy
    t_hat = policy.schedule.t_hat[1:]
    limit = float(t_hat[policy.schedule.trained][-2])  # the last two stochastic actions
    lora = {**dict(CONFIG.lora), "target_modules": SCORE_MODEL}
    late = BoltzSamplerPolicy(backend=_perturbed_model(), sft=dict(CONFIG.sft), lora=lora, sampling_steps=8, seed=0,
                              max_action_noise_angstrom=limit, shared_prefix=True)
    assert late.trained_actions.tolist() == (policy.schedule.trained & (t_hat <= limit)).tolist()
    first = int(late.trained_actions.nonzero()[0]) + 1  # the step of the first trained action
    assert late.shared_steps == first
    torch.manual_seed(1)
    shared = late.rollout(next(StructurePrompts(group_size=3, batch_size=3, paths=["package:boltz_ft/data/pdb"],
                                                max_tokens=24, seed=0)), 3)
    noisy = shared.payload["noisy"]
    assert torch.equal(noisy[0, :first], noisy[2, :first]) and not torch.equal(noisy[0, first], noisy[1, first])
    assert shared.step_mask[0].tolist() == late.trained_actions.tolist()
    recomputed = late.log_prob(shared, late.trained_actions.nonzero().flatten(), with_reference=False).logp
    assert torch.allclose(recomputed, shared.logp_old[:, late.trained_actions], rtol=1e-6)
    assert int(late.trained_actions.sum()) == 2 and late.describe(next(StructurePrompts(
        group_size=1, batch_size=1, paths=["package:boltz_ft/data/pdb"], max_tokens=16, seed=0)))[
        "sampler/trained_actions"] == 2
    with pytest.raises(ConfigError, match="max_action_noise_angstrom"):
        BoltzSamplerPolicy(backend=_perturbed_model(), sft=dict(CONFIG.sft), lora=lora, sampling_steps=8, seed=0,
                           max_action_noise_angstrom=1e-3)


def test_prompts_need_whole_groups():
    with pytest.raises(ConfigError, match="batch_size"):
        StructurePrompts(group_size=3, batch_size=4, paths=["package:boltz_ft/data/pdb"])
