"""GRPOStrategy (TRL semantics) and FedGRPOStrategy through the strategy contract
(:mod:`elign.engine.strategies.base`): configuration checks, hand-computed losses and advantages,
and FED-GRPO's outputs bit for bit against the formulas it had before the loss pieces were shared."""

import math
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from elign.engine.errors import ConfigError
from elign.engine.rollout import Rollout, StepLogProbs
from elign.engine.strategies import FedGRPOStrategy, GRPOStrategy
from elign.engine.updates import loss_means
from elign.engine.strategies.base import BatchCounts, LossInputs, RLStrategy, ScoredRewards

CONF = Path(__file__).resolve().parents[3] / "conf" / "strategy"


def batch_counts(mask: torch.Tensor, world_size: int = 1, global_tokens: float | None = None) -> BatchCounts:
    tokens, sequences = float(mask.sum()), float(mask.any(dim=1).sum())
    return BatchCounts(tokens=tokens, sequences=sequences, samples=float(mask.shape[0]),
                       global_tokens=tokens if global_tokens is None else global_tokens,
                       global_sequences=sequences, world_size=world_size, max_steps=mask.shape[1])


def inputs(logp, logp_old, adv, mask, reference=None, **kw) -> LossInputs:
    return LossInputs(logp=logp, logp_old=logp_old, advantages=adv, mask=mask, seq_tokens=mask.sum(dim=1),
                      counts=kw.pop("counts", batch_counts(mask)), reference=reference, **kw)


# --- GRPOStrategy ------------------------------------------------------------------------------

def test_grpo_yaml_has_trl_defaults_and_instantiates():
    s = instantiate(OmegaConf.load(CONF / "grpo.yaml"))
    assert isinstance(s, GRPOStrategy) and isinstance(s, RLStrategy)
    assert (s.loss_type, s.beta, s.epsilon_low, s.epsilon_high, s.delta) == ("dapo", 0.0, 0.2, 0.2, None)
    assert (s.scale_rewards, s.importance_sampling, s.multi_reward, s.std_eps) == (
        "group", "token", "sum_then_normalize", 1e-4)
    assert (s.kind, s.min_group_size, s.terminal_advantages) == ("rl", 2, True)
    assert not s.uses_reference and not s.needs_whole_sequences


def test_grpo_flags_follow_the_configuration():
    assert GRPOStrategy(importance_sampling="sequence").needs_whole_sequences
    assert GRPOStrategy(beta=0.04).uses_reference
    assert GRPOStrategy(epsilon_low=0.2, epsilon_high=0.28).epsilon_high == 0.28


@pytest.mark.parametrize("key, value", [
    ("std_eps", math.nan), ("std_eps", 0.0), ("epsilon_low", math.nan), ("epsilon_low", 0.0),
    ("epsilon_low", 1.5), ("epsilon_high", math.nan), ("epsilon_high", -0.1), ("delta", math.nan),
    ("delta", 1.1), ("beta", math.nan), ("beta", -1.0), ("beta", math.inf), ("default_weight", math.nan),
    ("default_weight", "heavy"), ("multi_reward", "sum"), ("scale_rewards", True), ("scale_rewards", "rank"),
    ("importance_sampling", "step"), ("loss_type", "luspo"), ("kl_estimator", "k2"),
])
def test_grpo_rejects_bad_values_naming_the_key(key, value):
    with pytest.raises(ConfigError) as info:
        GRPOStrategy(**{key: value})
    assert info.value.key == key


def test_grpo_rejects_bad_weights_and_unused_scaling():
    with pytest.raises(ConfigError) as info:
        GRPOStrategy(reward_weights={"rmsd": math.nan})
    assert info.value.key == "reward_weights.rmsd"
    with pytest.raises(ConfigError) as info:
        GRPOStrategy(multi_reward="normalize_then_sum", scale_rewards="none")
    assert info.value.key == "scale_rewards"


def test_grpo_loss_hand_computed_with_k3_and_clip_counts():
    s = GRPOStrategy(epsilon_low=0.2, epsilon_high=0.28, beta=0.5, loss_type="bnpo")
    ratio = torch.tensor([[0.7, 1.3], [2.0, 1.0]])
    logp = ratio.log().requires_grad_(True)
    adv = torch.tensor([[-1.0, -1.0], [2.0, 2.0]])
    mask = torch.tensor([[True, True], [True, False]])
    ref = StepLogProbs(logp=logp, ref_logp=logp.detach().clone())  # k3 = 0 at logp = ref
    ref.ref_logp[0, 0] = ref.ref_logp[0, 0] + math.log(2.0)  # k3 = 2 - ln 2 - 1 on pair (0, 0)
    loss, sums = s.loss(inputs(logp, torch.zeros(2, 2), adv, mask, ref))
    # pg per pair: -min(rho A, clip(rho, 0.8, 1.28) A): 0.8 (low-clipped), 1.3, -2.56 (high-clipped);
    # pair (1, 1) is off the mask
    kl00 = 1.0 - math.log(2.0)
    per_pair = [0.8 + 0.5 * kl00, 1.3, -2.56]
    assert loss.item() == pytest.approx(sum(per_pair) / 3, rel=1e-6)
    assert float(sums["count"]) == 3.0 and float(sums["loss"]) == pytest.approx(sum(per_pair), rel=1e-6)
    assert (float(sums["clipped"]), float(sums["clipped_low"]), float(sums["clipped_high"])) == (2.0, 1.0, 1.0)
    assert float(sums["ratio"]) == pytest.approx(0.7 + 1.3 + 2.0, rel=1e-6)
    assert float(sums["kl"]) == pytest.approx(kl00, rel=1e-6)
    assert all(not v.requires_grad for v in sums.values())
    means = loss_means({k: float(v) for k, v in sums.items()})  # logged under TRL's names
    assert means["clip_ratio/low_mean"] == means["clip_ratio/high_mean"] == pytest.approx(1 / 3)
    assert means["clip_ratio/region_mean"] == means["train/clip_frac"] == pytest.approx(2 / 3)
    assert means["train/ratio_mean"] == pytest.approx(4.0 / 3) and "train/clipped_low" not in means


def test_grpo_sequence_level_needs_whole_sequences_and_reference_when_beta():
    mask = torch.ones(1, 2, dtype=torch.bool)
    z = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="whole sequences"):
        GRPOStrategy(importance_sampling="sequence").loss(inputs(z, z, z, mask, whole_sequences=False))
    with pytest.raises(ValueError, match="reference"):
        GRPOStrategy(beta=0.1).loss(inputs(z, z, z, mask))


def test_grpo_sequence_level_loss_hand_computed():
    # GSPO: one ratio per sequence, exp of the mean log-ratio over its trained tokens.
    s = GRPOStrategy(importance_sampling="sequence", loss_type="grpo", epsilon_low=0.2, epsilon_high=0.2)
    logp = torch.tensor([[0.0, 0.2, 5.0], [0.5, 0.5, 0.5]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    adv = torch.tensor([[1.0] * 3, [1.0] * 3])
    loss, sums = s.loss(inputs(logp, torch.zeros(2, 3), adv, mask))
    # sequence 0: exp(0.1) = 1.105 (inside the band) ; sequence 1: exp(0.5) = 1.649 -> clipped at 1.2
    assert loss.item() == pytest.approx((-math.exp(0.1) - 1.2) / 2, rel=1e-6)
    assert float(sums["clipped_high"]) == 3.0  # the clipped sequence's three tokens
    assert float(sums["ratio"]) == pytest.approx(2 * math.exp(0.1) + 3 * math.exp(0.5), rel=1e-6)


def make_rollout(group_ids, t=3, step_mask=None):
    b = len(group_ids)
    mask = torch.ones(b, t, dtype=torch.bool) if step_mask is None else step_mask
    return Rollout(group_ids=torch.tensor(group_ids), logp_old=torch.zeros(b, t), step_mask=mask)


def test_grpo_advantages_are_terminal_weighted_and_keep_aware():
    s = GRPOStrategy(reward_weights={"a": 1.0, "b": 0.0}, default_weight=0.5)
    assert s.reward_weights(["a", "b", "c"]) == {"a": 1.0, "b": 0.0, "c": 0.5}
    rewards = ScoredRewards(
        channels={"a": torch.tensor([1.0, 3.0, 0.0, 50.0], dtype=torch.float64),
                  "b": torch.tensor([9.0, -9.0, 0.0, 0.0], dtype=torch.float64),
                  "c": torch.tensor([2.0, 2.0, 0.0, 0.0], dtype=torch.float64)},
        keep=torch.tensor([True, True, True, False]))
    adv, metrics = s.advantages(rewards, make_rollout([0, 0, 1, 1]))
    # totals 2, 4 (b weighs 0, c adds 1 each); group 1 has one kept member -> 0
    c = 1 / (math.sqrt(2) + 1e-4)
    expected = torch.tensor([[-c] * 3, [c] * 3, [0.0] * 3, [0.0] * 3])
    torch.testing.assert_close(adv, expected)
    assert adv.dtype == torch.float32
    assert metrics["train/adv_abs_mean"] == pytest.approx(2 * c / 3, rel=1e-6)
    assert metrics["train/adv_zero_frac"] == pytest.approx(1 / 3)
    assert metrics["frac_reward_zero_std"] == 0.5  # TRL's name: group 1 has one kept member, so no spread


# --- FED-GRPO ----------------------------------------------------------------------------------

def fed(**kw) -> FedGRPOStrategy:
    args = dict(channel_weights={"force": 1.0, "energy": 0.5}, default_weight=1.0, advantage_mode="terminal",
                pbrs_gamma=1.0, adv_clip=5.0, std_eps=1e-8, clip_range=0.2, kl_coef=0.5)
    args.update(kw)
    return FedGRPOStrategy(**args)


def test_fed_yaml_instantiates_with_the_gaussian_kl():
    s = instantiate(OmegaConf.load(CONF / "fed_grpo.yaml"))
    assert isinstance(s, FedGRPOStrategy) and isinstance(s, RLStrategy) and s.kl_estimator == "gaussian"


@pytest.mark.parametrize("key, value", [
    ("kl_coef", math.nan), ("clip_range", math.nan), ("clip_range", math.inf), ("std_eps", math.nan),
    ("adv_clip", math.nan), ("pbrs_gamma", math.nan), ("default_weight", math.nan), ("kl_estimator", "k1"),
    ("advantage_mode", "delta"),
])
def test_fed_rejects_bad_values_naming_the_key(key, value):
    with pytest.raises(ConfigError) as info:
        fed(**{key: value})
    assert info.value.key == key


def test_fed_loss_adds_kl_and_normalises_by_the_step_tokens():
    s = fed()
    logp = torch.zeros(2, 2)
    adv = torch.tensor([[1.0, 1.0], [-1.0, -1.0]])
    mask = torch.tensor([[True, True], [True, False]])
    ref = StepLogProbs(logp=logp, mean=torch.ones(2, 2, 1), ref_mean=torch.zeros(2, 2, 1),
                       std=torch.full((2, 2), 0.5), event_mask=torch.ones(2, 2, 1))  # KL = 1 / (2 * 0.25) = 2
    c = batch_counts(mask)
    c = BatchCounts(**{**c.__dict__, "tokens": 6.0})  # the step holds more pairs than this micro-batch
    loss, sums = s.loss(inputs(logp, torch.zeros(2, 2), adv, mask, ref, counts=c))
    # per pair: -A*1 + 0.5*2 -> [0, 0], [2, (2)] ; masked sum = 2 ; / 6
    torch.testing.assert_close(loss, torch.tensor(2.0 / 6.0))
    assert float(sums["count"]) == 3.0 and float(sums["kl"]) == 6.0 and float(sums["clipped"]) == 0.0
    # k3 instead: ref_logp = logp + ln 2 gives 1 - ln 2 per pair
    ref.ref_logp = logp + math.log(2.0)
    _, sums = fed(kl_estimator="k3").loss(inputs(logp, torch.zeros(2, 2), adv, mask, ref))
    assert float(sums["kl"]) == pytest.approx(3 * (1 - math.log(2.0)), rel=1e-6)


# The formulas of FedGRPOStrategy before the loss pieces were shared, kept verbatim as the reference.

def _old_group_index(group_ids):
    _, inverse = torch.unique(group_ids, return_inverse=True)
    return inverse, int(inverse.max().item()) + 1 if inverse.numel() else 0


def _old_group_normalize(values, group_ids, keep=None, eps=1e-8):
    squeeze = values.dim() == 1
    v = values.unsqueeze(1) if squeeze else values
    v = v.double()
    k = torch.ones(v.shape[0], dtype=torch.bool, device=v.device) if keep is None else keep.bool()
    idx, g = _old_group_index(group_ids)
    w = k.to(v.dtype).unsqueeze(1)
    count = torch.zeros(g, 1, dtype=v.dtype, device=v.device).index_add_(0, idx, w)
    total = torch.zeros(g, v.shape[1], dtype=v.dtype, device=v.device).index_add_(0, idx, v * w)
    mean = total / count.clamp_min(1)
    centred = (v - mean[idx]) * w
    var = torch.zeros_like(total).index_add_(0, idx, centred**2) / count.clamp_min(1)
    std = var.sqrt()[idx]
    adv = torch.where(std > eps, centred / (std + eps), torch.zeros_like(centred)) * w
    adv = adv.to(values.dtype)
    return adv.squeeze(1) if squeeze else adv


def _old_pbrs(potentials, terminal, evaluated, gamma=1.0):
    t = potentials.shape[1]
    remaining = torch.arange(t, 0, -1, device=potentials.device, dtype=potentials.dtype)
    discount = torch.pow(torch.as_tensor(gamma, dtype=potentials.dtype), remaining)
    returns = discount.unsqueeze(0) * terminal.unsqueeze(1) - potentials
    return torch.where(evaluated.unsqueeze(0), returns, torch.zeros_like(returns))


def _old_fed_advantages(channels, weights, group_ids, num_steps, returns=None, evaluated=None, keep=None,
                        clip=None, eps=1e-8):
    returns = returns or {}
    b = group_ids.shape[0]
    ref = next(iter(channels.values()))
    adv = torch.zeros(b, num_steps, dtype=ref.dtype, device=ref.device)
    for name, values in channels.items():
        w = weights[name]
        if w == 0.0:
            continue
        if name in returns:
            per_step = _old_group_normalize(returns[name], group_ids, keep, eps)
            adv = adv + w * per_step * evaluated.to(adv.dtype).unsqueeze(0)
        else:
            adv = adv + w * _old_group_normalize(values, group_ids, keep, eps).unsqueeze(1)
    if clip is not None:
        adv = adv.clamp(-clip, clip)
    return adv


def _old_advantages(s, rewards, rollout):
    channels = {name: values.to(torch.float64) for name, values in rewards.channels.items()}
    returns = {}
    if s.advantage_mode == "pbrs_return_to_go":
        for name, potentials in rewards.potentials.items():
            returns[name] = _old_pbrs(potentials.to(channels[name]), channels[name], rewards.potential_mask,
                                      s.pbrs_gamma)
    keep = rewards.keep
    adv = _old_fed_advantages(channels, {n: s.weight(n) for n in channels}, rollout.group_ids, rollout.num_steps,
                              returns=returns, evaluated=rewards.potential_mask,
                              keep=None if keep.all() else keep, clip=s.adv_clip, eps=s.std_eps)
    adv = adv.to(rollout.logp_old.dtype)
    metrics = {}
    trained = rollout.step_mask & keep.unsqueeze(1)
    if trained.any():
        a = adv[trained]
        metrics["train/adv_abs_mean"] = a.abs().mean().item()
        metrics["train/adv_zero_frac"] = (a == 0).float().mean().item()
    return adv, metrics


def _old_gaussian_kl(mean_p, mean_q, std, mask):
    diff2 = (mean_p - mean_q) ** 2 * mask
    per_sample = diff2.reshape(diff2.shape[0], -1).sum(dim=1)
    s = std.reshape(std.shape[0], -1)[:, 0] if std.dim() > 0 else std
    return per_sample / (2.0 * s**2)


def _old_masked_sum(values, mask):
    return (values * mask.to(values.dtype)).sum()


def _old_loss(s, batch):
    adv = batch.advantages
    if s.adv_clip is not None:
        adv = adv.clamp(-s.adv_clip, s.adv_clip)
    ratio = torch.exp(batch.logp - batch.logp_old)
    per_pair = torch.maximum(-adv * ratio, -adv * ratio.clamp(1.0 - s.clip_range, 1.0 + s.clip_range))
    clipped = (ratio.detach() - 1.0).abs() > s.clip_range
    kl = None
    if batch.reference is not None and s.kl_coef > 0:
        ref = batch.reference
        b, t = batch.logp.shape
        kl = _old_gaussian_kl(ref.mean.flatten(0, 1), ref.ref_mean.flatten(0, 1), ref.std.reshape(-1),
                              ref.event_mask.flatten(0, 1)).view(b, t)
        per_pair = per_pair + s.kl_coef * kl
    mask = batch.mask
    loss = _old_masked_sum(per_pair, mask) / max(batch.counts.tokens, 1.0)
    m = mask.to(per_pair.dtype)
    sums = {"count": m.sum().detach(), "loss": _old_masked_sum(per_pair.detach(), m),
            "clipped": _old_masked_sum(clipped.to(m.dtype), m), "ratio": _old_masked_sum(ratio.detach(), m)}
    if kl is not None:
        sums["kl"] = _old_masked_sum(kl.detach(), m)
    return loss, sums


def random_case(seed, mode):
    g = torch.Generator().manual_seed(seed)
    b, t, n = 16, 9, 4
    group_ids = torch.arange(4).repeat_interleave(4)[torch.randperm(b, generator=g)]
    step_mask = torch.ones(b, t, dtype=torch.bool)
    step_mask[:, :2] = False  # a skipped prefix
    rollout = Rollout(group_ids=group_ids, logp_old=torch.randn(b, t, generator=g), step_mask=step_mask)
    force = torch.randn(b, generator=g, dtype=torch.float64)
    force[group_ids == 3] = 1.5  # an all-equal group
    energy = 100 * torch.randn(b, generator=g, dtype=torch.float64)
    keep = torch.rand(b, generator=g) > 0.2
    evaluated = torch.rand(t, generator=g) > 0.4
    potentials = {"energy": torch.randn(b, t, generator=g, dtype=torch.float64)}
    rewards = ScoredRewards(channels={"force": force, "energy": energy, "extra": torch.randn(b, generator=g).double()},
                            keep=keep, potentials=potentials if mode == "pbrs_return_to_go" else {},
                            potential_mask=evaluated)
    mean = torch.randn(b, t, n, 3, generator=g)
    ref = StepLogProbs(logp=torch.zeros(b, t), mean=mean, ref_mean=mean + 0.1 * torch.randn(b, t, n, 3, generator=g),
                       std=torch.rand(b, t, generator=g) + 0.5,
                       event_mask=(torch.rand(b, t, n, 1, generator=g) > 0.3).float())
    logp = rollout.logp_old + 0.05 * torch.randn(b, t, generator=g)
    logp[:3] = rollout.logp_old[:3]  # ratio 1
    return rollout, rewards, ref, logp


@pytest.mark.parametrize("mode", ["terminal", "pbrs_return_to_go"])
@pytest.mark.parametrize("seed", [0, 1])
def test_fed_grpo_is_bitwise_the_previous_implementation(mode, seed):
    rollout, rewards, ref, logp0 = random_case(seed, mode)
    s = fed(advantage_mode=mode, adv_clip=1.5, clip_range=0.03, kl_coef=0.3, default_weight=0.25)
    adv, metrics = s.advantages(rewards, rollout)
    old_adv, old_metrics = _old_advantages(s, rewards, rollout)
    assert torch.equal(adv, old_adv) and metrics == old_metrics

    mask = rollout.step_mask & rewards.keep.unsqueeze(1)
    counts = batch_counts(mask, world_size=2, global_tokens=3.0 * float(mask.sum()))  # dapo would differ
    for rows, cols in [(slice(0, 16), slice(0, 9)), (slice(0, 6), slice(2, 5)), (slice(6, 16), slice(5, 9))]:
        grads, results = [], []
        for loss_fn in (s.loss, lambda batch: _old_loss(s, batch)):
            logp = logp0[rows, cols].clone().requires_grad_(True)
            sub = StepLogProbs(logp=logp, mean=ref.mean[rows, cols], ref_mean=ref.ref_mean[rows, cols],
                               std=ref.std[rows, cols], event_mask=ref.event_mask[rows, cols])
            batch = LossInputs(logp=logp, logp_old=rollout.logp_old[rows, cols], advantages=adv[rows, cols],
                               mask=mask[rows, cols], seq_tokens=mask[rows].sum(dim=1), counts=counts,
                               reference=sub, whole_sequences=cols == slice(0, 9))
            loss, sums = loss_fn(batch)
            loss.backward()
            grads.append(logp.grad)
            results.append((loss, sums))
        (new_loss, new_sums), (old_loss, old_sums) = results
        assert torch.equal(new_loss, old_loss)
        assert new_sums.keys() == old_sums.keys() and all(torch.equal(new_sums[k], old_sums[k]) for k in new_sums)
        assert torch.equal(grads[0], grads[1])
