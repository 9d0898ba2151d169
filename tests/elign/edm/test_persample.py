"""Per-sample gradients: the tape against per-molecule autograd, and a rollout with gradients
against the replayed (training-forward) policy gradient."""

from __future__ import annotations

import pytest
import torch

from elign.edm.egnn import EGNNDynamics
from elign.edm.persample import PerSampleTape
from elign.edm.policy import EDMPolicy
from elign.edm.schedule import PolynomialSchedule
from elign.engine.rollout import FusedPolicy
from tests.elign.edm.test_edm_policy import Denoiser


def _batch(counts: list[int], dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    n = max(counts)
    mask = torch.arange(n)[None] < torch.tensor(counts)[:, None]
    z = torch.randn(len(counts), n, 9, dtype=dtype) * mask[..., None]
    return z, torch.rand(len(counts), dtype=dtype), mask, torch.randn(len(counts), n, 9, dtype=dtype)


def _per_molecule_grads(net, z, t, mask, w, weights) -> list[torch.Tensor]:
    """sum_i weights[i] * grad of molecule i's output alone: the definition, one forward each."""
    net.zero_grad(set_to_none=True)
    for i in range(z.shape[0]):
        (weights[i] * (net(z[i : i + 1], t[i : i + 1], mask[i : i + 1]) * w[i : i + 1]).sum()).backward()
    out = [p.grad.clone() for p in net.parameters()]
    net.zero_grad(set_to_none=True)
    return out


def test_tape_equals_per_molecule_autograd() -> None:
    torch.manual_seed(0)
    net = EGNNDynamics(hidden_nf=16, num_layers=2, inv_sublayers=2).double()
    counts = [5, 5, 3, 7, 7, 7, 2]  # runs of equal sizes, one size twice apart, a 2-atom molecule
    z, t, mask, w = _batch(counts, torch.float64)
    tape = PerSampleTape(net, batch_size=10)
    with torch.enable_grad(), tape.record(first_sample=2):  # samples 2..8 of a batch of 10
        (net(z, t, mask) * w).sum().backward()
    assert all(p.grad is None for p in net.parameters()), "the tape, not .grad, takes the weight gradients"
    weights = torch.randn(10, dtype=torch.float64)
    tape.accumulate(weights)
    got = [p.grad.clone() for p in net.parameters()]
    expected = _per_molecule_grads(net, z, t, mask, w, weights[2:9])
    for (name, _), g, e in zip(net.named_parameters(), got, expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12, msg=name)


def test_tape_folds_stashed_steps_across_chunks() -> None:
    """Several recorded calls (steps) on two chunks with different molecules: node-level pairs are
    stashed and folded two steps at a time, or when the chunk changes, and the sums stay exact."""
    torch.manual_seed(0)
    net = EGNNDynamics(hidden_nf=16, num_layers=2).double()
    chunks = {0: _batch([5, 5, 3, 3], torch.float64), 4: _batch([6, 4], torch.float64)}
    calls = [0, 0, 0, 4, 4, 0, 4, 4, 4]
    probe = PerSampleTape(net, batch_size=6)
    with torch.enable_grad(), probe.record(0):
        (net(*chunks[0][:3]) * chunks[0][3]).sum().backward()
    step_mib = probe._step_bytes / 2**20
    for stash_mib in (0.0, 2.5 * step_mib, 64.0):  # capacity 1 step, 2 steps, all of them
        tape = PerSampleTape(net, batch_size=6, stash_mib=stash_mib)
        for first in calls:
            z, t, mask, w = chunks[first]
            with torch.enable_grad(), tape.record(first):
                (net(z, t, mask) * w).sum().backward()
        assert tape._stash_steps == max(1, int(stash_mib * 2**20) // probe._step_bytes)
        weights = torch.randn(6, dtype=torch.float64)
        tape.accumulate(weights)
        got = [p.grad.clone() for p in net.parameters()]
        expected = [torch.zeros_like(p) for p in net.parameters()]
        for first in calls:
            z, t, mask, w = chunks[first]
            for e, g in zip(expected, _per_molecule_grads(net, z, t, mask, w, weights[first:first + len(z)])):
                e.add_(g)
        for (name, _), g, e in zip(net.named_parameters(), got, expected):
            torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12, msg=f"{name}, stash {stash_mib:.3g} MiB")


def test_tape_in_bfloat16_points_the_same_way() -> None:
    torch.manual_seed(0)
    net = EGNNDynamics(hidden_nf=32, num_layers=2, compute_dtype="bfloat16")
    z, t, mask, w = _batch([6, 6, 6, 9, 9], torch.float32)
    tape = PerSampleTape(net, batch_size=5)
    with torch.enable_grad(), tape.record(first_sample=0):
        (net(z, t, mask) * w).sum().backward()
    weights = torch.randn(5)
    tape.accumulate(weights)
    got = torch.cat([p.grad.flatten() for p in net.parameters()])
    expected = torch.cat([g.flatten() for g in _per_molecule_grads(net, z, t, mask, w, weights)])
    assert torch.nn.functional.cosine_similarity(got, expected, dim=0) > 0.999


def test_tape_rejects_bad_layouts() -> None:
    net = EGNNDynamics(hidden_nf=8, num_layers=1).double()
    z, t, mask, w = _batch([4, 4, 4], torch.float64)
    tape = PerSampleTape(net, batch_size=2)
    with pytest.raises(ValueError, match="exceed the tape's batch of 2"), torch.enable_grad(), tape.record(0):
        net(z, t, mask)
    with pytest.raises(ValueError, match=r"weights must be \[B\]=2"):
        tape.accumulate(torch.ones(3))


def test_rollout_with_grads_equals_the_replayed_policy_gradient() -> None:
    """sum_i c_i G_i from the sampler's tape equals the gradient of sum_{i,t} c_i log p_{i,t}
    recomputed by ``log_prob`` on the recorded trajectories (what the replay update differentiates),
    and the trajectories are those of ``rollout`` with the same seed."""
    schedule = PolynomialSchedule()
    torch.manual_seed(0)
    policy = EDMPolicy(Denoiser(hidden_nf=16, num_layers=2).double(), schedule, num_steps=10, skip_prefix=3,
                       rollout_batch_size=3)  # two chunks: the second starts at sample 3
    assert isinstance(policy, FusedPolicy)
    prompts = torch.tensor([4, 6])
    torch.manual_seed(1)
    fused, tape = policy.rollout_with_grads(prompts, group_size=3)
    torch.manual_seed(1)
    plain = policy.rollout(prompts, group_size=3)
    torch.testing.assert_close(fused.payload["latents"], plain.payload["latents"], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(fused.logp_old, plain.logp_old, rtol=1e-9, atol=1e-9)
    assert all(p.grad is None for p in policy.module.parameters())

    weights = torch.randn(6, dtype=torch.float64)
    tape.accumulate(weights)
    got = [p.grad.clone() for p in policy.module.parameters()]
    policy.module.zero_grad(set_to_none=True)
    steps = torch.arange(10)
    logp = policy.log_prob(fused, steps, with_reference=False).logp
    (weights[:, None] * logp * fused.step_mask).sum().backward()
    for (name, p), g in zip(policy.module.named_parameters(), got):
        torch.testing.assert_close(g, p.grad, rtol=1e-7, atol=1e-9, msg=name)


def test_edm_trainer_fused_and_replayed_updates_agree(tmp_path) -> None:
    """Two FED-GRPO iterations on the EDM (float64, so only the order of sums differs): the weights
    after ``fused_rollout=true`` equal those after the replayed forward + backward."""
    from hydra import compose, initialize_config_dir

    import run as run_module
    from elign.engine.distributed import DistInfo
    from tests.elign.edm.test_learning import OVERRIDES
    from tests.test_run import CONF

    weights = {}
    for fused in (True, False):
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose("config", overrides=OVERRIDES + ["trainer.max_iterations=2", "model.num_steps=10",
                                                           "model.skip_prefix=4", f"trainer.fused_rollout={fused}"])
        torch.manual_seed(0)
        policy = run_module.build(cfg, "model")
        policy.module.double()
        policy.reference.double()
        trainer = run_module.build(cfg, "trainer", policy=policy, strategy=run_module.build(cfg, "strategy"),
                                   dataloader=run_module.build(cfg, "dataloader"), run_dir=str(tmp_path / str(fused)),
                                   dist=DistInfo(0, 1, 0, torch.device("cpu")), reward=run_module.build(cfg, "reward"),
                                   filter=run_module.build(cfg, "filter"))
        assert trainer.fused is fused
        start = [p.detach().clone() for p in policy.module.parameters()]
        trainer.fit()
        weights[fused] = [p.detach().clone() for p in policy.module.parameters()]
    moved = max(float((w - s).abs().max()) for w, s in zip(weights[True], start))
    assert moved > 1e-5, "the updates moved the weights"
    for a, b in zip(weights[True], weights[False]):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)  # AdamW divides tiny gradients by their size
