"""Building the causal LM behind :class:`molgen_grpo.policy.Qwen3Policy` (spec §4, §1.5 ``init_mode``).

``init: random`` builds ``Qwen3ForCausalLM`` from dimensions (tied embeddings, the tokenizer's
vocabulary size), seeded by torch's global RNG; ``init: pretrained`` loads any Hugging Face causal LM
from a local directory or a Hub id (offline: a local directory). Starting from a run checkpoint is
the policy's ``checkpoint`` key, applied to either. LoRA adapters come from PEFT.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, Qwen3Config, Qwen3ForCausalLM

from elign.engine.errors import ConfigError, check_int, check_range
from molgen_grpo.tokenizer import resolve_path

__all__ = ["DTYPES", "INITS", "LORA_KEYS", "build_model", "wrap_lora"]

INITS = ("random", "pretrained")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ATTENTION = ("sdpa", "eager", "flash_attention_2")
LORA_KEYS = ("r", "alpha", "dropout", "target_modules")


def build_model(
    vocab_size: int,
    init: str = "random",
    path: str | None = None,
    hidden_size: int = 1024,
    num_hidden_layers: int = 28,
    num_attention_heads: int = 16,
    num_key_value_heads: int = 8,
    intermediate_size: int = 3072,
    head_dim: int = 128,
    max_position_embeddings: int = 32768,
    rope_theta: float = 1_000_000.0,
    rms_norm_eps: float = 1e-6,
    dtype: str = "float32",
    attn_implementation: str = "sdpa",
) -> PreTrainedModel:
    """A causal LM with at least ``vocab_size`` embedding rows.

    The dimension defaults are Qwen3-0.6B's; they are used only with ``init: random``.

    Args:
        vocab_size: the tokenizer's length (``len(tokenizer)``, added tags included).
        init: ``random`` (Qwen3 from the dimensions below) or ``pretrained`` (``path``).
        path: with ``pretrained``, a local model directory or a Hub id; must be null with ``random``.
        hidden_size, num_hidden_layers, num_attention_heads, num_key_value_heads, intermediate_size,
            head_dim, max_position_embeddings, rope_theta, rms_norm_eps: Qwen3 dimensions.
        dtype: ``float32``, ``bfloat16`` or ``float16`` parameters.
        attn_implementation: ``sdpa``, ``eager`` or ``flash_attention_2`` (GPU only).
    Raises:
        ConfigError: a bad key, or a ``pretrained`` path that cannot be loaded.
    """
    if init not in INITS:
        raise ConfigError("init", init, INITS)
    if dtype not in DTYPES:
        raise ConfigError("dtype", dtype, tuple(DTYPES))
    if attn_implementation not in ATTENTION:
        raise ConfigError("attn_implementation", attn_implementation, ATTENTION)
    vocab_size = check_int("vocab_size", vocab_size, 1)
    if init == "pretrained":
        return _pretrained(path, vocab_size, DTYPES[dtype], attn_implementation)
    if path is not None:
        raise ConfigError("path", path, "null with init=random (or init=pretrained)")
    heads = check_int("num_attention_heads", num_attention_heads, 1)
    kv_heads = check_int("num_key_value_heads", num_key_value_heads, 1, heads,
                         allowed=f"a divisor of num_attention_heads={heads}")
    if heads % kv_heads:
        raise ConfigError("num_key_value_heads", num_key_value_heads, f"a divisor of num_attention_heads={heads}")
    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=check_int("hidden_size", hidden_size, 1),
        num_hidden_layers=check_int("num_hidden_layers", num_hidden_layers, 1),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=check_int("intermediate_size", intermediate_size, 1),
        head_dim=check_int("head_dim", head_dim, 1),
        max_position_embeddings=check_int("max_position_embeddings", max_position_embeddings, 1),
        rope_parameters={"rope_type": "default", "rope_theta": check_range("rope_theta", rope_theta, 0, low_open=True)},
        rms_norm_eps=check_range("rms_norm_eps", rms_norm_eps, 0, low_open=True),
        tie_word_embeddings=True,
    )
    config._attn_implementation = attn_implementation
    return Qwen3ForCausalLM(config).to(DTYPES[dtype])


def _pretrained(path: str | None, vocab_size: int, dtype: torch.dtype, attention: str) -> PreTrainedModel:
    if path is None:
        raise ConfigError("path", path, "a local model directory or a Hub id with init=pretrained")
    try:
        model = AutoModelForCausalLM.from_pretrained(resolve_path(str(path)), dtype=dtype, attn_implementation=attention)
    except (OSError, ValueError) as err:
        where = "the directory has no loadable model" if Path(resolve_path(str(path))).is_dir() else (
            "no such local directory, and the Hub id could not be loaded (no network or not cached): "
            "pass a local model directory")
        raise ConfigError("path", path, f"a model directory or a reachable Hub id ({where}; "
                                        f"{type(err).__name__}: {str(err).splitlines()[0][:160]})") from None
    if model.get_input_embeddings().weight.shape[0] < vocab_size:
        # Qwen3 pads its embedding to 151,936 rows, so its 4 tags need no resize (spec §1.3); others may.
        model.resize_token_embeddings(vocab_size)
    return model


def wrap_lora(model: PreTrainedModel, lora: Mapping[str, Any]) -> torch.nn.Module:
    """``model`` with PEFT LoRA adapters; only the adapters train.

    Args:
        lora: ``r`` (rank >= 1), ``alpha`` (> 0), ``dropout`` (in [0, 1)), ``target_modules`` (module
            names, e.g. ``[q_proj, k_proj, v_proj, o_proj]``).
    """
    from peft import LoraConfig, get_peft_model

    if not isinstance(lora, Mapping):
        raise ConfigError("lora", lora, f"null or a mapping with keys {', '.join(LORA_KEYS)}")
    unknown = sorted(set(lora) - set(LORA_KEYS))
    missing = sorted(set(LORA_KEYS) - set(lora))
    if unknown or missing:
        raise ConfigError("lora", dict(lora), f"a mapping with exactly the keys {', '.join(LORA_KEYS)} "
                                              f"(unknown: {unknown}, missing: {missing})")
    targets = lora["target_modules"]
    if isinstance(targets, str) or not targets:
        raise ConfigError("lora.target_modules", targets, "a non-empty list of module names, e.g. [q_proj, v_proj]")
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    absent = [t for t in targets if t not in names]
    if absent:
        raise ConfigError("lora.target_modules", list(targets), f"module names of the model, e.g. "
                                                                f"q_proj, k_proj, v_proj, o_proj (not found: {absent})")
    config = LoraConfig(r=check_int("lora.r", lora["r"], 1),
                        lora_alpha=check_range("lora.alpha", lora["alpha"], 0, low_open=True),
                        lora_dropout=check_range("lora.dropout", lora["dropout"], 0, 1, high_open=True),
                        target_modules=[str(t) for t in targets], bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, config)
