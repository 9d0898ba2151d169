"""StructureReward (boltz.md §5.2): channels of Boltz-2 samples against their group's target, on 1crn (24 tokens)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import Tensor

from boltz_ft import metrics
from boltz_ft.reward import CHANNELS, StructureReward
from elign.engine.errors import ConfigError
from elign.engine.rollout import Rollout

ALL = ["lddt_ca", "neg_rmsd", "tm_score", "clash", "chain_break", "proxy"]
CONFIG = Path(__file__).resolve().parents[2] / "conf" / "reward" / "boltz" / "structure.yaml"


def make_rollout(feats: dict, samples: list[Tensor], group_ids: list[int], groups: int = 2, **info) -> Rollout:
    """A rollout as the Boltz GRPO policy makes it: ``feat/*`` ``[P, ...]`` (the same target P times), coords
    ``[B, M, 3]``."""
    b = len(samples)
    return Rollout(group_ids=torch.tensor(group_ids), logp_old=torch.zeros(b, 3), step_mask=torch.ones(b, 3).bool(),
                   payload={"coords": torch.stack(samples)}, info=dict(info),
                   group_payload={f"feat/{k}": torch.stack([v] * groups)
                                  for k, v in feats.items() if torch.is_tensor(v)})


def truth(feats: dict) -> Tensor:
    """``[M, 3]`` the true coordinates (first conformer)."""
    return feats["coords"][0].clone()


def noised(feats: dict, sigma: float, seed: int) -> Tensor:
    """``[M, 3]`` the truth plus isotropic Gaussian noise of ``sigma`` Å on every atom."""
    g = torch.Generator().manual_seed(seed)
    return truth(feats) + sigma * torch.randn(truth(feats).shape, generator=g)


def rigid_copy(feats: dict) -> Tensor:
    """``[M, 3]`` the truth rotated by 90° about z and shifted."""
    rot = torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    return truth(feats) @ rot.T + torch.tensor([5.0, -3.0, 2.0])


def crystal_break(feats: dict) -> float:
    ca = metrics.ca_coords(truth(feats)[None], feats["token_to_center_atom"])
    return float(metrics.chain_break(ca, feats["asym_id"], feats["residue_index"], feats["token_pad_mask"],
                                     feats["mol_type"])[0])


def test_the_truth_and_a_rigid_copy_score_perfectly(crambin_features):
    f = crambin_features
    samples = [truth(f), rigid_copy(f), rigid_copy(f), truth(f)]
    out = StructureReward(channels=ALL)(make_rollout(f, samples, [0, 0, 1, 1]))
    c = out.channels
    assert set(c) == set(ALL) and all(v.shape == (4,) for v in c.values())
    assert torch.allclose(c["lddt_ca"], torch.ones(4, dtype=torch.float64))
    assert c["neg_rmsd"].abs().max() < 1e-3 and (c["neg_rmsd"] <= 0).all()
    assert torch.allclose(c["tm_score"], torch.ones(4, dtype=torch.float64), atol=1e-3)
    assert torch.equal(c["clash"], torch.zeros(4, dtype=torch.float64))  # -0.0 == 0.0
    brk = crystal_break(f)
    assert 0 < brk < 0.1 and torch.allclose(c["chain_break"], torch.full((4,), -brk, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(c["proxy"], torch.full((4,), 1 - 0.1 * brk, dtype=torch.float64), atol=1e-5)
    assert out.failures == {}
    assert out.metrics["clash_fraction_raw"] == 0 and out.metrics["chain_break_raw"] == pytest.approx(brk, abs=1e-5)


def test_noise_lowers_the_scores_and_ranks_each_group_by_noise_level(crambin_features):
    f = crambin_features
    sigmas = [0.1, 0.4, 1.0, 2.5]
    # group 1 holds the same noise levels in reverse order and interleaved with group 0
    samples, group_ids, level = [], [], []
    for i, s in enumerate(sigmas):
        samples += [noised(f, s, seed=i), noised(f, sigmas[-1 - i], seed=10 + i)]
        group_ids += [0, 1]
        level += [s, sigmas[-1 - i]]
    out = StructureReward(channels=["lddt_ca", "neg_rmsd", "proxy"], tm_method="approx")(
        make_rollout(f, samples, group_ids, target_ids=["1crn_a", "1crn_b"]))
    level = torch.tensor(level)
    for g in (0, 1):
        rows = torch.tensor(group_ids) == g
        order = torch.argsort(level[rows])  # least noise first
        for name in ("lddt_ca", "neg_rmsd", "proxy"):
            v = out.channels[name][rows][order]
            assert (v[:-1] > v[1:]).all(), (name, g, v)
    assert (out.channels["lddt_ca"][level > 0.2] < 1).all() and out.failures == {}
    assert out.metrics["reward_target/1crn_a/lddt_ca"] == pytest.approx(float(out.channels["lddt_ca"][0::2].mean()))
    per_target = {f"reward_target/1crn_{t}/{c}" for t in "ab" for c in ("lddt_ca", "neg_rmsd", "proxy")}
    assert set(out.metrics) == {"clash_fraction_raw", "chain_break_raw", *per_target}


def test_nonfinite_coordinates_fail_every_channel_and_spare_the_other_samples(crambin_features):
    f = crambin_features
    reward = StructureReward(channels=[*ALL], tm_method="approx")
    samples = [noised(f, 0.5, seed=i) for i in range(6)]
    clean = reward(make_rollout(f, samples, [0, 0, 0, 1, 1, 1]))
    real = f["atom_pad_mask"].bool()
    assert not real.all()  # the crop has padding atoms
    bad = [s.clone() for s in samples]
    bad[1][real.nonzero()[3, 0], 0] = float("nan")
    bad[4][real.nonzero()[0, 0]] = float("inf")
    bad[5][~real] = float("nan")  # padding holds garbage: not a failure
    out = reward(make_rollout(f, bad, [0, 0, 0, 1, 1, 1]))
    assert out.failures == {"nonfinite_coords": 2}
    for name in ALL:
        assert torch.isnan(out.channels[name][[1, 4]]).all(), name
        ok = torch.tensor([0, 2, 3, 5])
        assert torch.allclose(out.channels[name][ok], clean.channels[name][ok]), name


def test_interface_lddt_needs_two_chains(crambin_features):
    f = crambin_features
    samples = [truth(f), noised(f, 1.0, seed=0), truth(f), noised(f, 1.0, seed=1)]
    out = StructureReward(channels=["interface_lddt", "lddt_ca"])(make_rollout(f, samples, [0, 0, 1, 1]))
    assert torch.isnan(out.channels["interface_lddt"]).all()
    assert out.failures == {"no_interface": 4} and torch.isfinite(out.channels["lddt_ca"]).all()
    # the same crop split into two chains: tokens 12.. become chain B
    two = dict(f, asym_id=torch.where(torch.arange(len(f["asym_id"])) >= 12, 1, f["asym_id"]))
    out = StructureReward(channels=["interface_lddt"])(make_rollout(two, samples, [0, 0, 1, 1]))
    v = out.channels["interface_lddt"]
    assert out.failures == {} and v[0] == 1 and v[2] == 1 and v[1] < 1 and v[3] < 1
    # by hand: lDDT over inter-chain Cα pairs within 15 Å in the truth
    ca = metrics.ca_coords(torch.stack(samples), f["token_to_center_atom"])
    d_true, d_pred = torch.cdist(ca[0], ca[0]), torch.cdist(ca[1], ca[1])
    pair = (two["asym_id"][:, None] != two["asym_id"][None, :]) & (d_true < 15)
    score = sum(((d_pred - d_true).abs() < t).double() for t in (0.5, 1, 2, 4)) / 4
    assert float(v[1]) == pytest.approx(float(score[pair].mean()), abs=1e-6)


def test_proxy_is_lddt_minus_weighted_penalties(crambin_features):
    f = crambin_features
    samples = [noised(f, s, seed=i) for i, s in enumerate([0.3, 1.0, 1.6, 2.2])]
    reward = StructureReward(channels=["lddt_ca", "clash", "chain_break", "proxy"], tm_method="approx",
                             proxy_clash_weight=0.3, proxy_break_weight=0.2)
    c = reward(make_rollout(f, samples, [0, 0, 1, 1])).channels
    assert torch.allclose(c["proxy"], c["lddt_ca"] + 0.3 * c["clash"] + 0.2 * c["chain_break"])
    # hand check of the last sample against boltz_ft.metrics
    x, center = samples[-1][None], f["token_to_center_atom"]
    ca, true_ca = metrics.ca_coords(x, center), metrics.ca_coords(truth(f)[None], center)[0]
    resolved = (center.float() @ f["atom_resolved_mask"].float() > 0.5) & f["token_pad_mask"].bool()
    l = float(metrics.lddt(ca, true_ca, resolved)[0])
    clash = float(metrics.clash_fraction(x, f["atom_pad_mask"], f["atom_to_token"], f["asym_id"], f["residue_index"],
                                         f["ref_element"].argmax(-1), token_bonds=f["token_bonds"][..., 0])[0])
    brk = float(metrics.chain_break(ca, f["asym_id"], f["residue_index"], f["token_pad_mask"], f["mol_type"])[0])
    assert clash > 0 and brk > 0.5  # the penalties are active
    assert float(c["proxy"][-1]) == pytest.approx(l - 0.3 * clash - 0.2 * brk, abs=1e-5)
    assert float(c["clash"][-1]) == pytest.approx(-clash, abs=1e-6)


def test_a_failing_metric_fails_its_channel_only(crambin_features, monkeypatch):
    f = crambin_features
    reward = StructureReward(channels=["lddt_ca", "tm_score"], tm_method="approx")

    def broken(*args, **kwargs):
        raise RuntimeError("tm-align crashed")

    monkeypatch.setitem(reward._functions, "tm_score", broken)
    samples = [noised(f, 0.5, seed=i) for i in range(4)]
    samples[3][0, 0] = float("nan")
    out = reward(make_rollout(f, samples, [0, 0, 1, 1]))
    assert torch.isnan(out.channels["tm_score"]).all() and torch.isfinite(out.channels["lddt_ca"][:3]).all()
    assert out.failures == {"metric_error": 3, "nonfinite_coords": 1}


def test_bad_options_name_their_key():
    with pytest.raises(ConfigError) as err:
        StructureReward(channels=["lddt_ca", "gdt_ts"])
    assert err.value.key == "channels" and "interface_lddt" in str(err.value)
    from omegaconf import OmegaConf

    from run import build_node

    node = OmegaConf.create({"_target_": "boltz_ft.reward.StructureReward", "channels": ["lddt"]})
    with pytest.raises(ConfigError) as err:
        build_node(node, "reward")
    assert err.value.key == "reward.channels"
    for kwargs, key in [({"channels": []}, "channels"), ({"channels": ["proxy", "proxy"]}, "channels"),
                        ({"tm_method": "exact"}, "tm_method"), ({"clash_normalize": "residues"}, "clash_normalize"),
                        ({"proxy_clash_weight": math.nan}, "proxy_clash_weight")]:
        with pytest.raises(ConfigError) as err:
            StructureReward(**kwargs)
        assert err.value.key == key


def test_the_config_builds_the_reward():
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    reward = instantiate(OmegaConf.load(CONFIG))
    assert isinstance(reward, StructureReward) and reward.channels == ["proxy"]
    assert set(reward.metrics) == set(CHANNELS["proxy"]) and reward.proxy_clash_weight == 0.5
