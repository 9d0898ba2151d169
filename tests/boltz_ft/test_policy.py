"""BoltzPolicy: LoRA adapters only train and checkpoint, start from a run checkpoint, export merged weights."""

import pytest
import torch
from omegaconf import OmegaConf

from boltz_ft.backend import build_boltz2, load_boltz2
from boltz_ft.data import split_batch
from boltz_ft.lora import lora_scale
from boltz_ft.policy import BoltzPolicy
from elign.engine.errors import ConfigError

from conftest import POLICY_CONFIG, tiny_backend_arguments

CONFIG = OmegaConf.load(POLICY_CONFIG)


def _policy(**kwargs):
    args = dict(sft=dict(CONFIG.sft), lora=dict(CONFIG.lora), recycling_steps=1, seed=0)
    args.update(kwargs)
    return BoltzPolicy(build_boltz2(**tiny_backend_arguments(0)), **args)


def test_lora_policy_trains_and_stores_only_adapters(crambin_features):
    policy = _policy()
    names = [n for n, _ in policy.trainable_parameters()]
    assert names and all(n.endswith((".lora_A", ".lora_B")) for n in names)
    assert any(".tri_mul_out." in n for n in names) and any("token_transformer" in n for n in names)
    assert set(policy.state_dict()) == set(names) | {"base_fingerprint"}
    batch = split_batch(crambin_features, {"pdb_id": "1crn"})
    loss, metrics = policy.supervised_loss(batch)
    loss.backward()
    assert {"loss_distogram", "loss_mse", "loss_smooth_lddt", "num_samples", "recycling_steps"} <= set(metrics)
    frozen = [p for n, p in policy.module.named_parameters() if "lora_" not in n]
    assert all(p.grad is None for p in frozen)
    # B starts at 0, so only the B matrices get a gradient on the first step (dL/dA = B^T ... = 0).
    grads = {n: p.grad for n, p in policy.trainable_parameters()}
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.endswith("lora_B"))


def test_start_from_a_run_checkpoint_and_export_merged_weights(tmp_path, crambin_features):
    policy = _policy()
    with torch.no_grad():
        for name, param in policy.trainable_parameters():
            param.normal_(0, 0.05)
    torch.save({"model": policy.state_dict()}, tmp_path / "checkpoint_latest.pth")
    again = _policy(checkpoint=str(tmp_path / "checkpoint_latest.pth"))
    assert all(torch.equal(policy.state_dict()[k], v) for k, v in again.state_dict().items())
    # Adapters of another base (another initialisation seed) are refused, naming the key and the file.
    with pytest.raises(ConfigError, match="model.checkpoint.*another base model"):
        BoltzPolicy(build_boltz2(**tiny_backend_arguments(1)), sft=dict(CONFIG.sft), lora=dict(CONFIG.lora),
                    checkpoint=str(tmp_path / "checkpoint_latest.pth"))

    batch = split_batch(crambin_features, {"pdb_id": "1crn"})
    torch.manual_seed(0)
    adapted = policy.predict(batch, diffusion_samples=2, sampling_steps=3)["pdistogram"]
    with lora_scale(policy.model, 0.0):
        base = policy.predict(batch, diffusion_samples=2, sampling_steps=3)["pdistogram"]
    assert not torch.allclose(adapted, base)
    exported = policy.export(tmp_path / "merged.ckpt")
    model = load_boltz2(exported)  # plain containers: loads without unpickling code
    merged = BoltzPolicy(model, sft=dict(CONFIG.sft))
    torch.manual_seed(0)
    assert torch.allclose(merged.predict(batch, 2, 3)["pdistogram"], adapted, atol=1e-5)


def test_predict_shapes(crambin_features):
    policy = _policy(lora=None)
    batch = split_batch(crambin_features, {"pdb_id": "1crn"})
    out = policy.predict(batch, diffusion_samples=3, sampling_steps=2, confidence=True)
    atoms, tokens = crambin_features["ref_pos"].shape[0], crambin_features["res_type"].shape[0]
    assert out["coords"].shape == (3, atoms, 3) and out["plddt"].shape == (3, tokens)
    assert policy.module.training  # predict restores the training flag
    assert all(p.requires_grad for _, p in policy.trainable_parameters())


def test_bad_checkpoint_and_lora_keys_name_the_key(tmp_path):
    with pytest.raises(Exception, match="model.checkpoint"):
        _policy(checkpoint=str(tmp_path / "absent.pth"))
    with pytest.raises(Exception, match="model.lora"):
        _policy(lora={**dict(CONFIG.lora), "rank": 4})


def test_base_run_merges_adapters_of_the_same_base_only(tmp_path):
    """``model.base_run``: an earlier LoRA run's adapters merge into the base it was trained on; a backend built
    from another seed is refused (merged, its adapters would be noise on the wrong weights)."""
    policy = _policy()
    with torch.no_grad():
        for _, param in policy.trainable_parameters():
            param.normal_(0, 0.05)
    torch.save({"model": policy.state_dict()}, tmp_path / "checkpoint_latest.pth")
    OmegaConf.save({"model": {"lora": dict(CONFIG.lora)}}, tmp_path / "config.yaml")
    merged = BoltzPolicy(build_boltz2(**tiny_backend_arguments(0)), sft=dict(CONFIG.sft), base_run=str(tmp_path))
    base = build_boltz2(**tiny_backend_arguments(0))
    after, before = merged.model.state_dict(), base.state_dict()
    assert after.keys() == before.keys() and any(not torch.equal(after[k], before[k]) for k in before)
    with pytest.raises(ConfigError, match="model.base_run.*another base model"):
        BoltzPolicy(build_boltz2(**tiny_backend_arguments(1)), sft=dict(CONFIG.sft), base_run=str(tmp_path))
