"""A lean KV-cache sampler for Llama-layout decoders (Qwen3, Qwen2, Llama): the rollout's fast path.

At the model sizes GRPO on a CPU can afford, ``generate`` spends most of each token on the machinery
around the model (cache objects, mask building, per-module dispatch, stopping criteria) rather than
in the matrix products. This sampler draws from the same distribution with the model's own weights
and rotary embedding, in a loop of plain tensor ops:

* weights are read once per sampler (one per rollout) into a transient transposed copy (``[in, out]``, which small-batch
  matrix products run faster on than ``linear``'s ``[out, in]``), q/k/v and gate/up concatenated into
  one matrix each, PEFT LoRA adapters folded in with PEFT's own ``get_delta_weight``;
* the KV cache is preallocated ``[B, H_kv, L_prompt + T, D]`` and written in place;
* each token runs the transformers sampling step exactly: logits processors (the caller's, then
  temperature, top-k, top-p — ``generate``'s order), ``softmax`` and ``torch.multinomial`` on the
  global RNG, finished rows padded, stop when every row has stopped.

So for one seed it returns the tokens ``generate`` returns (the logits agree to float rounding; a
test checks token-for-token equality for Qwen3, Qwen2 and Llama, with LoRA, padding, top-k/top-p and
constrained decoding). Models of another layout use ``sampler: generate``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

__all__ = ["KVSampler", "unsupported_reason", "warpers"]

_LAYOUTS = ("qwen3", "qwen2", "llama")


def unsupported_reason(model: nn.Module) -> str | None:
    """Why :class:`KVSampler` cannot run ``model`` (None when it can)."""
    base = _base_model(model)
    config = base.config
    if config.model_type not in _LAYOUTS:
        return f"model_type {config.model_type!r} is not one of {_LAYOUTS}"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"hidden_act {config.hidden_act!r} is not silu"
    if any(t != "full_attention" for t in (getattr(config, "layer_types", None) or [])):
        return "sliding-window layers are not supported"
    if getattr(config, "use_sliding_window", False):
        return "use_sliding_window is set"
    if getattr(config, "mlp_bias", False):
        return "mlp_bias is set"
    return None


def warpers(temperature: float, top_k: int, top_p: float) -> list:
    """The sampling warpers ``generate`` appends after the caller's processors, in its order."""
    out: list = []
    if temperature != 1.0:
        out.append(TemperatureLogitsWarper(temperature))
    if top_k > 0:
        out.append(TopKLogitsWarper(top_k=top_k, min_tokens_to_keep=1))
    if top_p < 1.0:
        out.append(TopPLogitsWarper(top_p=top_p, min_tokens_to_keep=1))
    return out


@dataclass
class _Layer:
    """One decoder layer's weights as the loop uses them: projections transposed to ``[in, out]``."""

    norm_in: Tensor
    qkv: Tensor
    qkv_bias: Tensor | None
    qk_norm: Tensor | None  # [H + H_kv, 1, D]: q_norm's weight per query head, k_norm's per key head
    out: Tensor
    out_bias: Tensor | None
    norm_mlp: Tensor
    gate_up: Tensor
    down: Tensor


class KVSampler:
    """Samples completions of a Llama-layout causal LM (optionally PEFT-wrapped) with a static KV cache.

    Args:
        model: a ``Qwen3ForCausalLM`` / ``Qwen2ForCausalLM`` / ``LlamaForCausalLM``, or a PEFT model
            around one. Its weights are read once, here (a snapshot: build a sampler per rollout,
            so training between rollouts is seen and the chunks of one rollout share the copy).
    Raises:
        ValueError: the model's layout is not supported (:func:`unsupported_reason`).
    """

    def __init__(self, model: nn.Module) -> None:
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"KVSampler cannot run this model: {reason}")
        self.base = _base_model(model)
        with torch.no_grad():
            self.layers = [_read_layer(layer) for layer in self.base.model.layers]
            head_w, self.head_b = _effective_linear(self.base.lm_head)
            self.head_w = head_w.t().contiguous()

    @torch.no_grad()
    def generate(self, input_ids: Tensor, attention_mask: Tensor, max_new_tokens: int,
                 processors: LogitsProcessorList | Sequence, do_sample: bool, stop_ids: Sequence[int],
                 pad_id: int, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
        """Generate up to ``max_new_tokens`` tokens after each left-padded prompt.

        Args:
            input_ids: ``[B, Lp]`` prompts, left padded.
            attention_mask: ``[B, Lp]``, 0 on padding.
            processors: applied to the float32 logits ``[B, V]`` each step (caller's, then warpers).
            do_sample: multinomial sampling (True) or argmax.
            stop_ids: tokens that end a row; later tokens of that row are ``pad_id``.
            temperature: only for the returned log-probs (the warpers do the sampling's scaling).
        Returns:
            ``tokens [B, T']`` (``T' <= max_new_tokens``: the loop stops when every row has stopped)
            and ``logp [B, T']``: ``log_softmax(raw_logits / temperature)`` of each token, taken
            before any processor, as :class:`molgen_grpo.policy.Qwen3Policy` defines log-probs.
        """
        inner, config, layers = self.base.model, self.base.config, self.layers
        head_w, head_b = self.head_w, self.head_b
        dtype = inner.embed_tokens.weight.dtype
        batch, prompt_len = input_ids.shape
        total = prompt_len + max_new_tokens
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        eps = config.rms_norm_eps
        device = input_ids.device

        mask = attention_mask.bool()
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        positions = torch.cat([positions, positions[:, -1:] + torch.arange(1, max_new_tokens + 1, device=device)], 1)
        cos, sin = inner.rotary_emb(inner.embed_tokens.weight[:1], positions)  # [B, total, D]
        cos, sin = cos[:, None].to(dtype), sin[:, None].to(dtype)
        keys = torch.zeros(len(layers), batch, kv_heads, total, head_dim, dtype=dtype, device=device)
        values = torch.zeros_like(keys)
        visible = torch.cat([mask, torch.ones(batch, max_new_tokens, dtype=torch.bool, device=device)], 1)
        # SDPA turns a bool mask into this additive one on every call; build it once.
        bias = torch.zeros(batch, 1, 1, total, dtype=dtype, device=device)
        bias.masked_fill_(~visible[:, None, None], -torch.inf)
        scale = head_dim ** -0.5

        def rms(x: Tensor, weight: Tensor) -> Tensor:
            # sum().div_() is what mean() computes, without its dtype round trip.
            if x.dtype == torch.float32:
                return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True).div_(x.shape[-1]) + eps) * weight
            y = x.float()
            return weight * (y * torch.rsqrt(y.pow(2).sum(-1, keepdim=True).div_(y.shape[-1]) + eps)).to(x.dtype)

        def rope(x: Tensor, c: Tensor, s: Tensor) -> Tensor:
            half = x.shape[-1] // 2
            return x * c + torch.cat((-x[..., half:], x[..., :half]), -1) * s

        def forward(tokens: Tensor, start: int, attn: Tensor) -> Tensor:
            """Logits ``[B, V]`` after ``tokens [B, n]`` placed at cache slots ``start..start+n``."""
            n = tokens.shape[1]
            end = start + n
            c, s = cos[:, :, start:end], sin[:, :, start:end]
            h = F.embedding(tokens, inner.embed_tokens.weight)
            for i, w in enumerate(layers):
                qkv = _affine(rms(h, w.norm_in), w.qkv, w.qkv_bias).view(batch, n, heads + 2 * kv_heads, head_dim)
                qk, v = qkv.transpose(1, 2).split([heads + kv_heads, kv_heads], 1)
                if w.qk_norm is not None:
                    qk = rms(qk, w.qk_norm)
                q, k = rope(qk, c, s).split([heads, kv_heads], 1)
                keys[i, :, :, start:end] = k
                values[i, :, :, start:end] = v
                o = F.scaled_dot_product_attention(q, keys[i, :, :, :end], values[i, :, :, :end],
                                                   attn_mask=attn, scale=scale, enable_gqa=heads != kv_heads)
                h = h + _affine(o.transpose(1, 2).reshape(batch, n, heads * head_dim), w.out, w.out_bias)
                gate, up = (rms(h, w.norm_mlp) @ w.gate_up).chunk(2, -1)
                h = h + (F.silu(gate) * up) @ w.down
            return _affine(rms(h[:, -1], inner.norm.weight), head_w, head_b).float()

        # Prefill: causal and padding mask; a pad query sees itself so no softmax row is empty.
        causal = torch.ones(prompt_len, prompt_len, dtype=torch.bool, device=device).tril()
        eye = torch.eye(prompt_len, dtype=torch.bool, device=device)
        logits = forward(input_ids, 0, ((causal & mask[:, None, :]) | eye)[:, None])
        sequence = torch.full((batch, total), pad_id, dtype=input_ids.dtype, device=device)
        sequence[:, :prompt_len] = input_ids
        unfinished = torch.ones(batch, dtype=torch.bool, device=device)
        stops = torch.tensor(list(stop_ids), device=device)
        logps = []
        for t in range(max_new_tokens):
            end = prompt_len + t
            scores = logits
            for processor in processors:
                scores = processor(sequence[:, :end], scores)
            if do_sample:  # torch.multinomial's own one-sample algorithm (same RNG draws), minus its checks
                probs = F.softmax(scores, dim=-1)
                token = probs.div_(torch.empty_like(probs).exponential_()).argmax(-1)
            else:
                token = scores.argmax(-1)
            token.masked_fill_(~unfinished, pad_id)
            scaled = logits if temperature == 1.0 else logits / temperature
            logps.append(scaled.log_softmax(-1).gather(1, token[:, None]).squeeze(1))
            sequence[:, end] = token
            unfinished &= ~torch.isin(token, stops)
            if not bool(unfinished.any()) or t == max_new_tokens - 1:
                break
            logits = forward(token[:, None], end, bias[..., :end + 1])
        steps = len(logps)
        return sequence[:, prompt_len:prompt_len + steps], torch.stack(logps, 1)


def _affine(x: Tensor, weight_t: Tensor, bias: Tensor | None) -> Tensor:
    """``x @ weight_t (+ bias)`` with ``weight_t [in, out]``."""
    y = x @ weight_t
    return y if bias is None else y + bias


def _base_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper (or the model itself)."""
    getter = getattr(model, "get_base_model", None)
    return getter() if callable(getter) else model


def _effective_linear(module: nn.Module) -> tuple[Tensor, Tensor | None]:
    """Weight and bias a linear layer applies now: a PEFT LoRA layer's active adapters folded in."""
    if type(module) is nn.Linear:
        return module.weight, module.bias
    base = getattr(module, "base_layer", None)
    if isinstance(base, nn.Linear) and hasattr(module, "get_delta_weight"):
        weight = base.weight
        if not getattr(module, "disable_adapters", False) and not getattr(module, "merged", False):
            for name in module.active_adapters:
                if name in module.lora_A:
                    weight = weight + module.get_delta_weight(name)
        return weight, base.bias
    raise ValueError(f"KVSampler reads nn.Linear or PEFT LoRA layers, not {type(module).__name__}")


def _read_layer(layer: nn.Module) -> _Layer:
    attn, mlp = layer.self_attn, layer.mlp
    (wq, bq), (wk, bk), (wv, bv) = (_effective_linear(attn.q_proj), _effective_linear(attn.k_proj),
                                    _effective_linear(attn.v_proj))
    wo, bo = _effective_linear(attn.o_proj)
    biases = (bq, bk, bv)
    if any(b is not None for b in biases):
        biases = tuple(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device) if b is None else b
                       for b, w in zip(biases, (wq, wk, wv)))
    q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
    qk_norm = None
    if q_norm is not None:
        heads, kv_heads = wq.shape[0] // q_norm.weight.shape[0], wk.shape[0] // k_norm.weight.shape[0]
        qk_norm = torch.cat([q_norm.weight.expand(heads, -1), k_norm.weight.expand(kv_heads, -1)])[:, None]
    return _Layer(norm_in=layer.input_layernorm.weight, qkv=torch.cat([wq, wk, wv]).t().contiguous(),
                  qkv_bias=None if biases[0] is None else torch.cat(biases),
                  qk_norm=qk_norm,
                  out=wo.t().contiguous(), out_bias=bo, norm_mlp=layer.post_attention_layernorm.weight,
                  gate_up=torch.cat([_effective_linear(mlp.gate_proj)[0],
                                     _effective_linear(mlp.up_proj)[0]]).t().contiguous(),
                  down=_effective_linear(mlp.down_proj)[0].t().contiguous())
