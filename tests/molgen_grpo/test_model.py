"""Building the causal LM: random Qwen3 from dimensions, a local pretrained directory, LoRA, errors."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

import torch  # noqa: E402
from transformers import Qwen3ForCausalLM  # noqa: E402

from elign.engine.errors import ConfigError  # noqa: E402
from molgen_grpo.model import build_model, wrap_lora  # noqa: E402

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
            head_dim=8, max_position_embeddings=256)
LORA = dict(r=2, alpha=4, dropout=0.0, target_modules=["q_proj", "v_proj"])


def test_random_init_has_the_dimensions_and_tied_embeddings():
    torch.manual_seed(0)
    model = build_model(179, **TINY)
    assert isinstance(model, Qwen3ForCausalLM)
    config = model.config
    assert (config.vocab_size, config.hidden_size, config.num_hidden_layers, config.num_key_value_heads,
            config.head_dim) == (179, 32, 2, 2, 8)
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert model.model.layers[0].self_attn.q_proj.weight.shape == (4 * 8, 32)
    assert model.config._attn_implementation == "sdpa"
    torch.manual_seed(0)
    again = build_model(179, **TINY)  # seeded by torch's global RNG
    assert torch.equal(again.lm_head.weight, model.lm_head.weight)


def test_pretrained_directory_loads_the_same_weights_and_grows_the_vocabulary(tmp_path):
    torch.manual_seed(0)
    model = build_model(100, **TINY)
    model.save_pretrained(tmp_path)
    same = build_model(100, init="pretrained", path=str(tmp_path))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), same.state_dict().values()))
    bigger = build_model(104, init="pretrained", path=str(tmp_path))  # 4 tags more than its embedding rows
    assert bigger.get_input_embeddings().weight.shape == (104, 32)
    assert torch.equal(bigger.get_input_embeddings().weight[:100], model.get_input_embeddings().weight)
    smaller = build_model(90, init="pretrained", path=str(tmp_path))  # Qwen-style spare rows stay
    assert smaller.get_input_embeddings().weight.shape[0] == 100


@pytest.mark.parametrize("kwargs, key", [
    (dict(init="scratch"), "init"),
    (dict(init="random", path="x"), "path"),
    (dict(init="pretrained"), "path"),
    (dict(num_key_value_heads=3), "num_key_value_heads"),
    (dict(num_key_value_heads=8), "num_key_value_heads"),
    (dict(dtype="float64"), "dtype"),
    (dict(attn_implementation="flex"), "attn_implementation"),
    (dict(hidden_size=0), "hidden_size"),
])
def test_bad_keys_are_named(kwargs, key):
    with pytest.raises(ConfigError, match=f"invalid config value {key}="):
        build_model(50, **{**TINY, **kwargs})


def test_missing_pretrained_path_says_to_pass_a_local_directory(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConfigError, match="path=.*pass a local model directory"):
        build_model(50, init="pretrained", path="Qwen/Qwen3-0.6B-Base")
    with pytest.raises(ConfigError, match="the directory has no loadable model"):
        build_model(50, init="pretrained", path=str(tmp_path))


def test_lora_trains_only_the_adapters():
    torch.manual_seed(0)
    peft_model = wrap_lora(build_model(50, **TINY), LORA)
    trainable = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    # per layer and target: A [r, in] + B [out, r]; q_proj 32 -> 32, v_proj 32 -> 2 heads * 8 = 16
    assert sum(p.numel() for p in trainable.values()) == 2 * ((2 * 32 + 32 * 2) + (2 * 32 + 16 * 2))


@pytest.mark.parametrize("lora, key", [
    (dict(LORA, rank=2), "lora"),
    ({k: v for k, v in LORA.items() if k != "alpha"}, "lora"),
    (dict(LORA, r=0), "lora.r"),
    (dict(LORA, dropout=1.0), "lora.dropout"),
    (dict(LORA, target_modules=["qkv"]), "lora.target_modules"),
    (dict(LORA, target_modules="q_proj"), "lora.target_modules"),
])
def test_bad_lora_configs_are_named(lora, key):
    with pytest.raises(ConfigError, match=f"invalid config value {key}="):
        wrap_lora(build_model(50, **TINY), lora)
