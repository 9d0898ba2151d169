"""EDMPolicy: rollout layout, shared prefix, decode step, log-prob consistency, KL, config errors,
checkpoint loading, and the Hydra YAML files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import Tensor, nn

from elign.edm.egnn import EGNNDynamics
from elign.edm.policy import EDMPolicy
from elign.edm.schedule import PolynomialSchedule
from elign.engine.errors import ConfigError
from elign.engine.rollout import Policy

ROOT = Path(__file__).resolve().parents[3]
SCHEDULE = PolynomialSchedule()
T = 10


class Denoiser(EGNNDynamics):
    """Noise prediction that is near-optimal for data concentrated at 0 (``eps = z_t / sigma_t``) plus a
    small EGNN term. A random EGNN alone makes the latents blow up to ~1e5 (its eps does not cancel
    ``z_t / alpha_{t|s}``), where float32 round-off dominates every log-prob; a trained model keeps
    them O(1), and so does this one."""

    def forward(self, z: Tensor, t: Tensor, node_mask: Tensor, full_precision: bool | Tensor = False) -> Tensor:
        sigma = torch.sigmoid(SCHEDULE.gamma(t)).sqrt().to(z.dtype).view(-1, 1, 1)
        return 0.1 * super().forward(z, t, node_mask, full_precision) + z / sigma


def _policy(denoiser: bool = True, **kwargs) -> EDMPolicy:
    torch.manual_seed(0)
    cls = Denoiser if denoiser else EGNNDynamics
    args = {"num_steps": T, "share_initial_noise": True, "skip_prefix": 0} | kwargs
    return EDMPolicy(cls(hidden_nf=16, num_layers=2), SCHEDULE, **args)


def test_rollout_layout_and_decode_step() -> None:
    policy = _policy(record_z0_pred=True)
    assert isinstance(policy, Policy)
    policy.module.train()
    ro = policy.rollout(torch.tensor([4, 6]), group_size=3)
    assert policy.module.training  # mode restored after sampling in eval
    b, n = 6, 6
    assert ro.logp_old.shape == (b, T) and ro.step_mask.all()  # no decode column
    assert ro.group_ids.tolist() == [0, 0, 0, 1, 1, 1]
    p = ro.payload
    assert p["latents"].shape == (b, T + 1, n, 9) and p["z0_pred"].shape == (b, T, n, 9)
    assert p["node_mask"].sum(1).tolist() == [4, 4, 4, 6, 6, 6]
    assert p["positions"].shape == (b, n, 3) and p["logp_decode"].shape == (b,)
    assert torch.isfinite(p["logp_decode"]).all()
    torch.testing.assert_close(p["positions"].sum(1), torch.zeros(b, 3), atol=1e-5, rtol=0)
    z0 = p["latents"][:, -1]
    mask = p["node_mask"]
    assert torch.equal(p["atom_types"], torch.where(mask, z0[..., 3:8].argmax(-1), 0))
    assert torch.equal(p["charges"], torch.where(mask, torch.round(z0[..., 8] * 10).long(), 0))
    assert torch.all(p["latents"][~mask.unsqueeze(1).expand(b, T + 1, n)] == 0)
    times = ro.info["step_times"]
    assert times.shape == (T,) and times[0] == 1.0 and times[-1] == pytest.approx(1 / T)
    assert ro.info["metrics"]["rollout/mean_atoms"] == 5.0


def test_logp_old_equals_recomputed_log_prob_float32() -> None:
    policy = _policy(skip_prefix=2)
    ro = policy.rollout(torch.tensor([5, 9, 3]), group_size=2)
    assert ro.payload["latents"].abs().max() < 20
    out = policy.log_prob(ro, torch.arange(T), with_reference=True)
    logp, kl = out.logp, out.gaussian_kl()
    assert logp.requires_grad
    # the reference is the same network here: its log-probs are the policy's
    torch.testing.assert_close(out.ref_logp, logp.detach(), atol=1e-4, rtol=0)
    torch.testing.assert_close(logp.detach(), ro.logp_old, atol=1e-4, rtol=0)
    torch.testing.assert_close(kl.detach(), torch.zeros_like(kl), atol=1e-6, rtol=0)


def test_logp_old_equals_recomputed_log_prob_random_net_float64() -> None:
    policy = _policy(denoiser=False, share_initial_noise=False)
    policy.to("cpu").module.double()
    policy.reference.double()
    ro = policy.rollout(torch.tensor([5, 7]), group_size=2)
    steps = torch.tensor([7, 0, 3])
    logp = policy.log_prob(ro, steps, with_reference=False).logp
    torch.testing.assert_close(logp.detach(), ro.logp_old[:, steps], atol=1e-6, rtol=0)


def test_log_prob_invariant_to_global_translation() -> None:
    policy = _policy()
    ro = policy.rollout(torch.tensor([5, 4]), group_size=2)
    shifted = ro.select(torch.arange(4))
    lat = shifted.payload["latents"].clone()
    shift = torch.tensor([3.0, -2.0, 1.5]).view(1, 1, 1, 3)
    lat[..., :3] += shift * shifted.payload["node_mask"][:, None, :, None]
    shifted.payload["latents"] = lat
    steps = torch.arange(T)
    a = policy.log_prob(ro, steps, with_reference=False).logp
    b = policy.log_prob(shifted, steps, with_reference=False).logp
    torch.testing.assert_close(a, b, atol=2e-4, rtol=0)


def test_shared_prefix_branches_after_k_steps() -> None:
    k = 4
    policy = _policy(skip_prefix=k, record_z0_pred=True)
    ro = policy.rollout(torch.tensor([5, 6]), group_size=3)
    lat, logp, z0p = ro.payload["latents"], ro.logp_old, ro.payload["z0_pred"]
    for g in (slice(0, 3), slice(3, 6)):
        assert torch.equal(lat[g, : k + 1], lat[g.start : g.start + 1, : k + 1].expand_as(lat[g, : k + 1]))
        assert torch.equal(logp[g, :k], logp[g.start : g.start + 1, :k].expand(3, k))
        assert torch.equal(z0p[g, :k], z0p[g.start : g.start + 1, :k].expand_as(z0p[g, :k]))
        assert not torch.equal(lat[g.start, k + 1], lat[g.start + 1, k + 1])  # independent after k
        assert logp[g.start, k] != logp[g.start + 1, k]
    assert not torch.equal(lat[0, 0, :5], lat[3, 0, :5])  # groups differ
    assert not ro.step_mask[:, :k].any() and ro.step_mask[:, k:].all()


def test_share_initial_noise_without_prefix_and_independent_noise() -> None:
    shared = _policy(share_initial_noise=True).rollout(torch.tensor([5]), group_size=3).payload["latents"]
    assert torch.equal(shared[0, 0], shared[1, 0]) and torch.equal(shared[0, 0], shared[2, 0])
    assert not torch.equal(shared[0, 1], shared[1, 1])
    indep = _policy(share_initial_noise=False).rollout(torch.tensor([5]), group_size=3).payload["latents"]
    assert not torch.equal(indep[0, 0], indep[1, 0])


def test_rollout_in_chunks_keeps_groups_together() -> None:
    policy = _policy(rollout_batch_size=4, skip_prefix=2)
    ro = policy.rollout(torch.tensor([3, 8, 5]), group_size=2)
    lat = ro.payload["latents"]
    assert lat.shape == (6, T + 1, 8, 9) and ro.payload["node_mask"].sum(1).tolist() == [3, 3, 8, 8, 5, 5]
    for g in range(3):
        assert torch.equal(lat[2 * g, :3], lat[2 * g + 1, :3])
    logp = policy.log_prob(ro, torch.arange(T), with_reference=False).logp
    torch.testing.assert_close(logp.detach(), ro.logp_old, atol=1e-4, rtol=0)


def test_rollout_batch_size_not_multiple_of_group_raises() -> None:
    policy = _policy(rollout_batch_size=6)
    with pytest.raises(ConfigError) as info:
        policy.rollout(torch.tensor([5, 5]), group_size=4)
    assert info.value.key == "rollout_batch_size"


@pytest.mark.parametrize(
    ("kwargs", "key", "text"),
    [
        ({"num_steps": 30}, "num_steps", "divisors of 1000: 1, 2, 4, 5, 8"),
        ({"num_steps": 0}, "num_steps", "divisors"),
        ({"skip_prefix": T}, "skip_prefix", "[0, num_steps - 1"),
        ({"skip_prefix": 2, "share_initial_noise": False}, "skip_prefix", "share_initial_noise"),
        ({"rollout_batch_size": 0}, "rollout_batch_size", "multiple"),
    ],
)
def test_constructor_config_errors(kwargs: dict, key: str, text: str) -> None:
    with pytest.raises(ConfigError) as info:
        _policy(**kwargs)
    assert info.value.key == key and text in str(info.value) and key in str(info.value)


def test_kl_and_gradients_after_an_update() -> None:
    policy = _policy()
    ro = policy.rollout(torch.tensor([4, 5]), group_size=2)
    with torch.no_grad():
        for p in policy.module.parameters():
            p.add_(0.05 * torch.randn_like(p))
    steps = torch.tensor([2, 5, 9])
    out = policy.log_prob(ro, steps, with_reference=True)
    logp, kl = out.logp, out.gaussian_kl()
    assert kl.shape == (4, 3) and (kl > 0).all()
    # both policies share the step std, so log p - log p_ref = (|z - mu_ref|^2 - |z - mu|^2) / (2 s^2)
    assert not torch.allclose(out.ref_logp, logp.detach())
    (logp.sum() - kl.sum()).backward()
    grads = [p.grad for p in policy.module.parameters()]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
    assert all(p.grad is None for p in policy.reference.parameters())


def test_distribute_routes_log_prob_through_wrapper() -> None:
    calls: list[int] = []

    class Wrapper(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, *args: Tensor) -> Tensor:
            calls.append(args[0].shape[0])
            return self.inner(*args)

    policy = _policy()
    policy.distribute(Wrapper)
    ro = policy.rollout(torch.tensor([4]), group_size=2)
    policy.log_prob(ro, torch.tensor([1, 2, 3]), with_reference=False)
    assert calls == [2 * 3]  # one forward over b * t molecules


def test_checkpoint_formats_load_and_reference_is_taken_after(tmp_path: Path) -> None:
    torch.manual_seed(1)
    source = EGNNDynamics(hidden_nf=16, num_layers=2)
    state = source.state_dict()
    upstream = {"buffer": torch.zeros(1), "gamma.gamma": SCHEDULE.table.clone()}
    upstream |= {f"dynamics.{k}": v for k, v in state.items()}
    files = {
        "raw.pt": state,
        "trainer.pt": {"model": {f"module.{k}": v for k, v in state.items()}, "step": 3},
        "upstream.npy": upstream,
    }
    for name, obj in files.items():
        torch.save(obj, tmp_path / name)
        policy = _policy(denoiser=False, checkpoint=str(tmp_path / name))
        for key, value in state.items():
            assert torch.equal(policy.module.state_dict()[key], value), (name, key)
            assert torch.equal(policy.reference.state_dict()[key], value), (name, key)
    with pytest.raises(ConfigError, match="checkpoint"):
        _policy(checkpoint=str(tmp_path / "missing.pt"))
    torch.save({"egnn.embedding.weight": torch.zeros(3, 3)}, tmp_path / "bad.pt")
    with pytest.raises(ConfigError, match="checkpoint"):
        _policy(checkpoint=str(tmp_path / "bad.pt"))


def test_yaml_configs_instantiate() -> None:
    small = instantiate(OmegaConf.load(ROOT / "conf/model/edm/small.yaml"))
    assert isinstance(small, EDMPolicy) and small.num_steps == 50
    qm9_cfg = OmegaConf.load(ROOT / "conf/model/edm/qm9.yaml")
    assert qm9_cfg.num_steps == 1000 and qm9_cfg.skip_prefix == 600
    qm9_dyn = instantiate(qm9_cfg.dynamics)
    assert sum(p.numel() for p in qm9_dyn.parameters()) == 5_339_920  # spec: upstream trainable count
    prompts = instantiate(OmegaConf.load(ROOT / "conf/dataloader/edm/qm9_nodes.yaml"))
    assert prompts.group_size == 8 and next(prompts).shape == (2,)
    reward = instantiate(OmegaConf.load(ROOT / "conf/reward/edm/compactness.yaml"))
    assert callable(reward)
