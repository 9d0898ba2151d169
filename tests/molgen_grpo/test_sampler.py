"""KVSampler against transformers' ``generate``: for one seed, the same tokens (and the recorder's
log-probs) for Qwen3, Qwen2 and Llama layouts, left padding, stop tokens, temperature / top-k /
top-p, greedy, PEFT LoRA and constrained decoding; unsupported layouts are refused by name."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import (GenerationConfig, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,  # noqa: E402
                          LogitsProcessorList, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

from elign.engine.errors import ConfigError  # noqa: E402
from molgen_grpo.policy import Prompt, Qwen3Policy, _LogProbRecorder  # noqa: E402
from molgen_grpo.sampler import KVSampler, unsupported_reason, warpers  # noqa: E402
from molgen_grpo.tokenizer import ASSET_PATH, load_tokenizer, stop_token_ids  # noqa: E402

DIMS = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=48,
            max_position_embeddings=256)
STOP = ["[/CONFORMER]", "<|endoftext|>"]
TEXTS = ["[SMILES]CCO[/SMILES]"] * 2 + ["[SMILES]O=C(O)c1ccccc1[/SMILES]"] * 2  # different prompt lengths


@pytest.fixture(scope="module")
def tokenizer():
    tok = load_tokenizer(ASSET_PATH)
    tok.padding_side = "left"
    return tok


def model_of(kind: str, vocab: int) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(vocab_size=vocab, head_dim=8, **DIMS))
    elif kind == "qwen2":  # q/k/v biases, no q/k norms
        model = Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab, **DIMS))
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.q_proj.bias.normal_()
    else:
        model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, **DIMS))
    with torch.no_grad():  # norms away from 1 so a wrong norm weight would show
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    return model.eval()


def reference(model, enc, stops, pad, temperature, top_k, top_p, do_sample, steps, seed):
    """transformers' generate with the policy's log-prob recorder."""
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p) if do_sample else {}
    config = GenerationConfig(do_sample=do_sample, max_new_tokens=steps, num_beams=1, eos_token_id=stops,
                              pad_token_id=pad, use_cache=True, **sampling)
    recorder = _LogProbRecorder(temperature)
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(**enc, generation_config=config, logits_processor=LogitsProcessorList([recorder]))
    tokens = out[:, enc["input_ids"].shape[1]:]
    return tokens, recorder.finish(tokens[:, -1])


def ours(model, enc, stops, pad, temperature, top_k, top_p, do_sample, steps, seed):
    torch.manual_seed(seed)
    processors = warpers(temperature, top_k, top_p) if do_sample else []
    return KVSampler(model).generate(enc["input_ids"], enc["attention_mask"], steps, processors, do_sample, stops,
                                     pad, temperature)


@pytest.mark.parametrize("kind", ["qwen3", "qwen2", "llama"])
@pytest.mark.parametrize("temperature, top_k, top_p, do_sample", [(1.0, 0, 1.0, True), (0.7, 9, 0.9, True),
                                                                  (1.0, 0, 1.0, False)])
def test_same_tokens_and_log_probs_as_generate(tokenizer, kind, temperature, top_k, top_p, do_sample):
    model = model_of(kind, len(tokenizer))
    enc = tokenizer(TEXTS, padding=True, add_special_tokens=False, return_tensors="pt")
    stops = stop_token_ids(tokenizer, STOP)
    args = (model, enc, stops, tokenizer.pad_token_id, temperature, top_k, top_p, do_sample, 40)
    for seed in (1, 2):
        want_tokens, want_logp = reference(*args, seed)
        got_tokens, got_logp = ours(*args, seed)
        assert torch.equal(got_tokens, want_tokens)
        torch.testing.assert_close(got_logp, want_logp, atol=2e-5, rtol=1e-5)
    assert enc["attention_mask"].min() == 0  # the case covers left padding


def test_rows_stop_and_pad_like_generate(tokenizer):
    """A stop token made likely: rows end at different steps, later tokens are pads, the loop stops early."""
    model = model_of("qwen3", len(tokenizer))
    stops = stop_token_ids(tokenizer, STOP)
    with torch.no_grad():
        model.lm_head.weight[stops[0]] = 0.3
    enc = tokenizer(TEXTS, padding=True, add_special_tokens=False, return_tensors="pt")
    args = (model, enc, stops, tokenizer.pad_token_id, 1.0, 0, 1.0, True, 60, 3)
    want_tokens, want_logp = reference(*args)
    got_tokens, got_logp = ours(*args)
    assert torch.equal(got_tokens, want_tokens)
    assert got_tokens.shape[1] < 60 and (got_tokens == tokenizer.pad_token_id).any()
    torch.testing.assert_close(got_logp, want_logp, atol=2e-5, rtol=1e-5)


def test_lora_adapter_is_folded_in_and_disabling_it_is_seen(tokenizer):
    model = get_peft_model(model_of("qwen3", len(tokenizer)),
                           LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "gate_proj", "lm_head"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    enc = tokenizer(TEXTS, padding=True, add_special_tokens=False, return_tensors="pt")
    stops = stop_token_ids(tokenizer, STOP)
    args = (model, enc, stops, tokenizer.pad_token_id, 1.0, 0, 1.0, True, 30, 4)
    with_adapter = ours(*args)[0]
    assert torch.equal(with_adapter, reference(*args)[0])
    with model.disable_adapter():
        without = ours(*args)[0]
        assert torch.equal(without, reference(*args)[0])
    assert not torch.equal(with_adapter, without)


def test_policy_rollouts_agree_between_samplers_with_constrained_decoding(tokenizer):
    prompts = [Prompt(0, "[SMILES]CCO[/SMILES]"), Prompt(1, "[SMILES]O=C(O)c1ccccc1[/SMILES]")]
    rollouts = []
    for sampler in ("kv", "generate"):
        torch.manual_seed(0)
        policy = Qwen3Policy(tokenizer, model_of("qwen3", len(tokenizer)), stop_tokens=STOP, max_new_tokens=48,
                             constrained=True, top_k=12, temperature=0.8, sampler=sampler)
        torch.manual_seed(7)
        rollouts.append(policy.rollout(prompts, 2))
    kv, gen = rollouts
    for key in ("prompt_ids", "completion_ids", "completion_mask"):
        assert torch.equal(kv.payload[key], gen.payload[key]), key
    assert torch.equal(kv.step_mask, gen.step_mask)
    assert kv.step_mask.sum() < kv.payload["completion_mask"].sum()  # forced template tokens are not trained
    torch.testing.assert_close(kv.logp_old, gen.logp_old, atol=2e-5, rtol=1e-5)


def test_unsupported_layouts_are_named(tokenizer):
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2))
    assert "gpt2" in unsupported_reason(gpt2)
    with pytest.raises(ValueError, match="gpt2"):
        KVSampler(gpt2)
    sliding = Qwen3ForCausalLM(Qwen3Config(vocab_size=len(tokenizer), head_dim=8, use_sliding_window=True,
                                           sliding_window=16, max_window_layers=0, **DIMS))
    assert unsupported_reason(sliding) is not None
    with pytest.raises(ConfigError, match="sampler"):
        Qwen3Policy(tokenizer, gpt2, stop_tokens=STOP, max_new_tokens=8, sampler="kv")
    with pytest.raises(ConfigError, match="sampler"):
        Qwen3Policy(tokenizer, model_of("qwen3", len(tokenizer)), stop_tokens=STOP, max_new_tokens=8, sampler="vllm")
    # generate serves any causal LM
    Qwen3Policy(tokenizer, gpt2, stop_tokens=["<|endoftext|>"], max_new_tokens=8, sampler="generate")
