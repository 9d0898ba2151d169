"""LoRA as a weight parametrisation (boltz_ft.lora) on a plain Linear and on the tiny official Boltz2."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from boltz_ft.lora import (LoRAParametrization, apply_lora, load_lora_state_dict, lora_parameters, lora_scale,
                           lora_state_dict, merge_lora, set_lora_scale)
from elign.engine.errors import ConfigError

try:  # tests/boltz_ft may or may not be a package
    from .conftest import tiny_backend_arguments
except ImportError:
    from conftest import tiny_backend_arguments

TRUNK = ["pairformer_module.layers.*.attention.proj_*", "tri_mul_in.p_in", "tri_mul_out.p_out",
         "structure_module.score_model.token_transformer.layers.*.pair_bias_attn.proj_q"]
P_IN = "pairformer_module.layers.0.tri_mul_in.p_in"


def _perturb_trunk(model: nn.Module, seed: int = 3) -> nn.Module:
    """Noise on the trunk's weights, in eval mode: boltz zero-initialises output projections (``proj_o``,
    ``p_out``), which would hide an adapter upstream of them (identical outputs, zero gradients)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.pairformer_module.parameters():
            param.add_(torch.randn(param.shape, generator=g) * 0.05)
    return model.eval()


@pytest.fixture
def model(tiny_boltz2):
    return _perturb_trunk(tiny_boltz2)


def _module(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name)


def _pairformer(model: nn.Module, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The trunk (tri_mul, triangle attention, single attention, transitions) on random s, z: ``[1, 6, ...]``."""
    g = torch.Generator().manual_seed(seed)
    n, cs, cz = 6, model.pairformer_module.layers[0].attention.proj_q.in_features, 16
    s, z = torch.randn(1, n, cs, generator=g), torch.randn(1, n, n, cz, generator=g)
    mask = torch.ones(1, n)
    return model.pairformer_module(s, z, mask, mask[:, :, None] * mask[:, None, :])


def _randomise_adapters(model: nn.Module, seed: int = 1) -> None:
    """Nonzero B (and new A) so that the adapted model differs from the base."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in lora_parameters(model):
            param.copy_(torch.randn(param.shape, generator=g) * 0.1)


def test_hand_computed_effective_weight_on_a_plain_linear():
    model = nn.ModuleDict({"lin": nn.Linear(3, 2)})
    with torch.no_grad():
        model.lin.weight.copy_(torch.tensor([[1.0, 0.0, -1.0], [2.0, 1.0, 0.5]]))
        model.lin.bias.copy_(torch.tensor([0.5, -0.5]))
    assert apply_lora(model, ["lin"], r=1, alpha=2.0, dropout=0.0, seed=0) == ["lin"]
    (_, a), (_, b) = lora_parameters(model)
    assert a.shape == (1, 3) and b.shape == (2, 1) and torch.equal(b, torch.zeros(2, 1))  # A [r, in], B [out, r]
    with torch.no_grad():
        a.copy_(torch.tensor([[1.0, 2.0, 3.0]]))
        b.copy_(torch.tensor([[1.0], [-1.0]]))
    # W + (alpha / r) * B @ A = W + 2 * [[1, 2, 3], [-1, -2, -3]]
    expected = torch.tensor([[3.0, 4.0, 5.0], [0.0, -3.0, -5.5]])
    assert torch.equal(model.lin.weight, expected)
    x = torch.tensor([[1.0, 1.0, 1.0]])
    assert torch.equal(model.lin(x), torch.tensor([[12.5, -9.0]]))  # x @ W_eff^T + bias
    with lora_scale(model, 0.5):
        assert torch.equal(model.lin.weight, torch.tensor([[2.0, 2.0, 2.0], [1.0, -1.0, -2.5]]))
    assert torch.equal(model.lin.weight, expected)  # scale restored


def test_zero_b_equals_base_on_a_linear_and_on_the_trunk(model):
    layer = _module(model, P_IN)
    x = torch.randn(5, layer.in_features)
    base_linear, base_trunk = layer(x), _pairformer(model)
    adapted = apply_lora(model, TRUNK, r=4, alpha=8.0, dropout=0.0, seed=0)
    assert P_IN in adapted and "pairformer_module.layers.0.attention.proj_o" in adapted
    assert all(torch.count_nonzero(a) > 0 for n, a in lora_parameters(model) if n.endswith("lora_A"))
    assert torch.equal(layer(x), base_linear)
    for got, want in zip(_pairformer(model), base_trunk):
        assert torch.equal(got, want)


def test_scale_zero_reproduces_the_base_exactly(model):
    base = _pairformer(model)
    apply_lora(model, TRUNK, r=4, alpha=8.0, dropout=0.0, seed=0)
    _randomise_adapters(model)
    adapted = _pairformer(model)
    assert not torch.allclose(adapted[0], base[0]) and not torch.allclose(adapted[1], base[1])
    with lora_scale(model, 0.0):
        for got, want in zip(_pairformer(model), base):
            assert torch.equal(got, want)
    for got, want in zip(_pairformer(model), adapted):  # the previous scale is back
        assert torch.equal(got, want)
    set_lora_scale(model, 0)
    assert torch.equal(_pairformer(model)[1], base[1])
    with pytest.raises(ValueError, match="no LoRA"):
        set_lora_scale(nn.Linear(2, 2), 0.0)


def test_tri_mul_weight_attribute_itself_is_adapted(tiny_boltz2):
    """The cuequivariance kernel reads ``p_in.weight`` directly: the attribute must carry the adapter."""
    layer = _module(tiny_boltz2, P_IN)
    w = layer.weight.detach().clone()  # [2 * token_z, token_z]
    apply_lora(tiny_boltz2, ["tri_mul_in.p_in"], r=2, alpha=3.0, dropout=0.0, seed=0)
    _randomise_adapters(tiny_boltz2)
    lora = layer.parametrizations.weight[0]
    assert isinstance(lora, LoRAParametrization)
    assert torch.equal(layer.parametrizations.weight.original, w)  # base untouched
    torch.testing.assert_close(layer.weight, w + 1.5 * lora.lora_B @ lora.lora_A, atol=1e-6, rtol=0)
    assert not torch.allclose(layer.weight, w)


def test_gradients_reach_only_the_adapters(model):
    apply_lora(model, TRUNK, r=2, alpha=2.0, dropout=0.0, seed=0)
    _randomise_adapters(model)
    s, z = _pairformer(model)
    (s.square().mean() + z.square().mean()).backward()
    adapters = {id(p) for _, p in lora_parameters(model)}
    with_grad = {id(p) for p in model.parameters() if p.grad is not None}
    assert with_grad == {i for i in adapters if i in with_grad}  # nothing but adapters has a gradient
    trunk_adapters = [p for n, p in lora_parameters(model) if n.startswith("pairformer_module")]
    assert trunk_adapters and all(p.grad is not None and p.grad.abs().sum() > 0 for p in trunk_adapters)


def test_only_base_parameters_are_frozen(tiny_boltz2):
    n_base = sum(p.numel() for p in tiny_boltz2.parameters())
    adapted = apply_lora(tiny_boltz2, TRUNK, r=4, alpha=8.0, dropout=0.0, seed=0)
    trainable = [p for p in tiny_boltz2.parameters() if p.requires_grad]
    shapes = [_module(tiny_boltz2, n).parametrizations.weight.original.shape for n in adapted]
    assert sum(p.numel() for p in trainable) == sum(4 * (o + i) for o, i in shapes)
    assert len(trainable) == 2 * len(adapted)
    frozen = sum(p.numel() for p in tiny_boltz2.parameters() if not p.requires_grad)
    assert frozen == n_base


def test_pattern_semantics(tiny_boltz2):
    names = apply_lora(tiny_boltz2, ["proj_q"], r=1, alpha=1.0, dropout=0.0, seed=0)
    assert names and all(n.endswith(".proj_q") for n in names)  # suffix at a dot boundary
    assert "structure_module.score_model.token_transformer.layers.0.pair_bias_attn.proj_q" in names
    with pytest.raises(RuntimeError, match="already"):
        apply_lora(tiny_boltz2, ["proj_q"], r=1, alpha=1.0, dropout=0.0, seed=0)
    # boltz registers output_projection_linear also as output_projection.0: either name targets it, once
    alias = apply_lora(tiny_boltz2, ["token_transformer.layers.0.output_projection.0"], r=1, alpha=1.0)
    assert alias == ["structure_module.score_model.token_transformer.layers.0.output_projection_linear"]


def test_unmatched_pattern_raises_config_error_naming_it(tiny_boltz2):
    with pytest.raises(ConfigError) as info:
        apply_lora(tiny_boltz2, ["proj_q", "roj_q", "no_such_layer"], r=2, alpha=4.0, dropout=0.0, seed=0)
    assert info.value.key == "model.lora.target_modules" and info.value.value == "roj_q"
    assert "'roj_q'" in str(info.value) and "pairformer_module.layers.0" in str(info.value)
    assert not lora_parameters(tiny_boltz2) and any(p.requires_grad for p in tiny_boltz2.parameters())
    with pytest.raises(ConfigError, match="model.lora.r"):
        apply_lora(tiny_boltz2, ["proj_q"], r=0, alpha=4.0)
    with pytest.raises(ConfigError, match="model.lora.dropout"):
        apply_lora(tiny_boltz2, ["proj_q"], r=2, alpha=4.0, dropout=1.0)


def test_state_dict_round_trip(model):
    # A copy of the base: build_boltz2(seed=...) is not bit-reproducible (boltz's lecun_normal_init_ draws
    # from scipy's truncnorm, i.e. numpy's global RNG, which the torch seed does not cover).
    other = copy.deepcopy(model)
    adapted = apply_lora(model, TRUNK, r=4, alpha=8.0, dropout=0.0, seed=0)
    _randomise_adapters(model)
    state = {k: v.clone() for k, v in lora_state_dict(model).items()}
    assert sorted(state) == sorted(f"{n}.lora_{m}" for n in adapted for m in "AB")
    apply_lora(other, TRUNK, r=4, alpha=8.0, dropout=0.0, seed=7)
    load_lora_state_dict(other, state)
    for got, want in zip(_pairformer(other), _pairformer(model)):
        assert torch.equal(got, want)
    with pytest.raises(ValueError, match="missing 1"):
        load_lora_state_dict(other, {k: v for k, v in state.items() if k != f"{P_IN}.lora_A"})
    with pytest.raises(ValueError, match="unexpected 1"):
        load_lora_state_dict(other, {**state, "nope.lora_A": state[f"{P_IN}.lora_A"]})
    with pytest.raises(ValueError, match="shapes"):
        load_lora_state_dict(other, {**state, f"{P_IN}.lora_A": torch.zeros(3, 16)})


def test_merge_matches_the_adapted_model_and_loads_into_a_fresh_boltz2(model):
    from boltz_ft.backend import build_boltz2

    base_keys = list(model.state_dict())
    apply_lora(model, TRUNK, r=4, alpha=8.0, dropout=0.0, seed=0)
    _randomise_adapters(model)
    adapted = _pairformer(model)
    merged = merge_lora(model)
    assert merged is model and not lora_parameters(model)
    assert list(merged.state_dict()) == base_keys
    assert type(_module(merged, P_IN)) is nn.Linear  # the parametrised class is gone
    for got, want in zip(_pairformer(merged), adapted):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    fresh = build_boltz2(**tiny_backend_arguments(seed=1)).eval()
    fresh.load_state_dict(merged.state_dict(), strict=True)
    for got, want in zip(_pairformer(fresh), adapted):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_dropout_masks_input_columns_of_a_in_training_only():
    torch.manual_seed(0)
    model = nn.ModuleDict({"lin": nn.Linear(64, 3, bias=False)})
    apply_lora(model, ["lin"], r=2, alpha=2.0, dropout=0.5, seed=0)
    lora = model.lin.parametrizations.weight[0]
    with torch.no_grad():
        lora.lora_B.fill_(1.0)
    w = model.lin.parametrizations.weight.original
    full = lora.delta(use_dropout=False)  # [out, in]
    model.train()
    delta = model.lin.weight - w
    dropped = delta.abs().sum(0) == 0  # whole input columns [in] are zero ...
    assert 0 < int(dropped.sum()) < 64
    torch.testing.assert_close(delta[:, ~dropped], 2 * full[:, ~dropped])  # ... the others scaled by 1 / (1 - p)
    model.eval()
    torch.testing.assert_close(model.lin.weight, w + full, atol=0, rtol=0)


def _full_forward(model: nn.Module, feats: dict) -> dict[str, torch.Tensor]:
    """Boltz2.forward (trunk, 2 sampler steps, confidence) with a fixed sampler noise."""
    batch = {k: (v[None] if torch.is_tensor(v) else v) for k, v in feats.items()}
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(0)
        out = model(batch, recycling_steps=0, num_sampling_steps=2, diffusion_samples=1)
    return {k: out[k] for k in ("s", "z", "pdistogram", "sample_atom_coords", "plddt_logits", "pae_logits")}


def test_full_boltz2_forward_base_scale_zero_and_merge(model, crambin_features):
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():  # the score model's zero-initialised output would make coordinates ignore the trunk
        for param in model.structure_module.parameters():
            param.add_(torch.randn(param.shape, generator=g) * 0.05)
    base = _full_forward(model, crambin_features)
    apply_lora(model, [*TRUNK, "transition_z.fc1"], r=4, alpha=8.0, dropout=0.1, seed=0)
    for key, value in _full_forward(model, crambin_features).items():  # B = 0 (and eval: no dropout)
        assert torch.equal(value, base[key]), key
    _randomise_adapters(model)
    adapted = _full_forward(model, crambin_features)
    assert not torch.allclose(adapted["z"], base["z"])
    assert not torch.allclose(adapted["sample_atom_coords"], base["sample_atom_coords"])
    with lora_scale(model, 0):
        for key, value in _full_forward(model, crambin_features).items():
            assert torch.equal(value, base[key]), key
    merged = _full_forward(merge_lora(model), crambin_features)
    for key, value in merged.items():
        torch.testing.assert_close(value, adapted[key], atol=1e-5, rtol=1e-5, msg=key)
