"""Qwen3Policy with a random-weight tiny Qwen3 and the shipped tokenizer: rollout, log-probs,
constrained decoding, LoRA and frozen references, supervised loss, checkpoints, export."""

from __future__ import annotations

import pytest

pytest.importorskip("rdkit")
pytest.importorskip("transformers")
pytest.importorskip("peft")

import torch  # noqa: E402
from rdkit import Chem  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from elign.engine.errors import ConfigError  # noqa: E402
from elign.engine.rollout import Policy  # noqa: E402
from molgen_grpo.model import build_model  # noqa: E402
from molgen_grpo.policy import Prompt, Qwen3Policy, until_stop  # noqa: E402
from molgen_grpo.text import decode, same_graph  # noqa: E402
from molgen_grpo.tokenizer import ASSET_PATH, load_tokenizer  # noqa: E402

TINY = dict(init="random", hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=64, head_dim=8, max_position_embeddings=1024)
LORA = dict(r=2, alpha=4, dropout=0.0, target_modules=["q_proj", "v_proj"])
STOP = ["[/CONFORMER]", "<|endoftext|>"]
PROMPTS = [Prompt(0, "[SMILES]CCO[/SMILES]"), Prompt(1, "[SMILES]O=C(O)c1ccccc1[/SMILES]")]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ASSET_PATH)


def make(tokenizer, seed=0, **kwargs):
    torch.manual_seed(seed)
    kwargs = {"stop_tokens": STOP, "max_new_tokens": 24, **kwargs}
    return Qwen3Policy(tokenizer, kwargs.pop("model", TINY), **kwargs)


def trained_columns(rollout):
    return torch.nonzero(rollout.step_mask.any(dim=0)).squeeze(1)


def full_log_softmax(policy, rollout, temperature):
    """log_softmax(logits / T) of every completion token from a plain full forward (no cache)."""
    ids = torch.cat([rollout.payload["prompt_ids"], rollout.payload["completion_ids"]], dim=1)
    mask = torch.cat([rollout.payload["prompt_mask"], torch.ones_like(rollout.payload["completion_ids"])], dim=1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0) * mask
    with torch.no_grad():
        logits = policy.module(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    lp = rollout.payload["prompt_ids"].shape[1]
    logp = torch.log_softmax(logits[:, lp - 1:-1] / temperature, dim=-1)
    return logp.gather(-1, rollout.payload["completion_ids"].unsqueeze(-1)).squeeze(-1)


def test_policy_implements_the_engine_protocol(tokenizer):
    assert isinstance(make(tokenizer), Policy)


def test_until_stop_by_hand():
    completion = torch.tensor([[5, 4, 7, 4], [5, 6, 7, 8], [0, 5, 5, 5]])
    assert until_stop(completion, [4, 0]).tolist() == [
        [True, True, False, False], [True, True, True, True], [True, False, False, False]]


def test_rollout_shapes_groups_and_masks(tokenizer):
    policy = make(tokenizer, max_new_tokens=24)
    same_text = [Prompt("a", "[SMILES]CCO[/SMILES]"), {"prompt_id": "b", "text": "[SMILES]CCO[/SMILES]"},
                 Prompt("c", "[SMILES]C1CC1[/SMILES]")]
    rollout = policy.rollout(same_text, group_size=2)
    assert rollout.group_ids.tolist() == [0, 0, 1, 1, 2, 2]  # same text, different ids: different groups
    assert rollout.logp_old.shape == rollout.step_mask.shape == (6, 24)
    payload = rollout.payload
    assert payload["completion_ids"].shape == payload["completion_mask"].shape == (6, 24)
    width = len(tokenizer.encode("[SMILES]C1CC1[/SMILES]"))  # the longest prompt; CCO is left padded
    assert payload["prompt_ids"].shape == payload["prompt_mask"].shape == (6, width)
    assert payload["prompt_mask"][0].tolist() == [0] * (width - 5) + [1] * 5
    assert payload["prompt_ids"][0, :width - 5].eq(tokenizer.pad_token_id).all()
    assert torch.equal(rollout.step_mask, payload["completion_mask"])  # unconstrained: every generated token
    assert torch.equal(payload["completion_mask"], until_stop(payload["completion_ids"], [4, 0]))
    after = ~payload["completion_mask"]
    assert payload["completion_ids"][after].eq(tokenizer.pad_token_id).all()
    assert rollout.logp_old[after].eq(0).all() and (rollout.logp_old[~after] < 0).all()
    assert rollout.info["prompt_ids"] == ["a", "a", "b", "b", "c", "c"]
    assert len(rollout.info["completions"]) == 6
    for text, ids, mask in zip(rollout.info["completions"], payload["completion_ids"], payload["completion_mask"]):
        assert text == tokenizer.decode(ids[mask], skip_special_tokens=True)
    lengths = payload["completion_mask"].sum(1).double()
    assert rollout.info["metrics"]["completions/mean_length"] == pytest.approx(float(lengths.mean()))


def test_step_mask_stops_after_the_first_stop_token(tokenizer):
    # Many stop tokens: most rows stop early, at their first stop token, and are padded after it.
    stops = STOP + ["C", "c", "1", "2", "(", ")", "=", "[C]", "[O]", "[c]", "0", ".", "-", ",", "<", ">"]
    policy = make(tokenizer, stop_tokens=stops, max_new_tokens=30)
    rollout = policy.rollout(PROMPTS, group_size=4)
    ids, mask = rollout.payload["completion_ids"], rollout.step_mask
    stop_ids = torch.tensor([tokenizer.convert_tokens_to_ids(s) for s in stops])
    lengths = mask.sum(1)
    assert (lengths < 30).sum() >= 4
    for row in range(ids.shape[0]):
        n = int(lengths[row])
        assert mask[row, :n].all() and not mask[row, n:].any()
        if n < 30:
            assert ids[row, n - 1] in stop_ids and not torch.isin(ids[row, :n - 1], stop_ids).any()
    assert rollout.info["metrics"]["completions/clipped_ratio"] == pytest.approx(float((lengths == 30).double().mean()))


def test_mask_truncated_completions_trains_no_token_of_a_cut_completion(tokenizer):
    stops = STOP + ["C", "c", "1", "(", ")", "=", "[C]", "[O]", "0", ".", "-", ","]
    kept = make(tokenizer, stop_tokens=stops, max_new_tokens=12).rollout(PROMPTS, group_size=4)
    masked = make(tokenizer, stop_tokens=stops, max_new_tokens=12, mask_truncated_completions=True).rollout(PROMPTS, 4)
    torch.testing.assert_close(masked.payload["completion_ids"], kept.payload["completion_ids"])  # same samples
    cut = kept.payload["completion_mask"].sum(1) == 12
    stopped_at_end = torch.isin(kept.payload["completion_ids"][:, -1], torch.tensor(
        [tokenizer.convert_tokens_to_ids(s) for s in stops]))
    truncated = cut & ~stopped_at_end
    assert truncated.any() and (~truncated).any()
    assert not masked.step_mask[truncated].any()
    torch.testing.assert_close(masked.step_mask[~truncated], kept.step_mask[~truncated])
    assert masked.payload["completion_mask"].equal(kept.payload["completion_mask"])  # the reward still sees the text


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.7, 0, 1.0), (0.7, 5, 0.9)])
def test_logp_old_is_log_prob_at_the_sampling_weights(tokenizer, temperature, top_k, top_p):
    """TRL's semantics: log_softmax(logits / T) of the raw model, not renormalised by top-k / top-p."""
    policy = make(tokenizer, temperature=temperature, top_k=top_k, top_p=top_p, max_new_tokens=20)
    rollout = policy.rollout(PROMPTS, group_size=3)
    mask = rollout.step_mask
    out = policy.log_prob(rollout, torch.arange(20), with_reference=False)
    assert out.logp.requires_grad and out.ref_logp is None
    assert (out.logp - rollout.logp_old)[mask].abs().max() < 1e-5
    assert (full_log_softmax(policy, rollout, temperature) - out.logp.detach())[mask].abs().max() < 1e-5
    some = torch.tensor([0, 3, 7])  # a subset of columns gives the same values at those columns
    part = policy.log_prob(rollout, some, with_reference=False).logp
    assert torch.allclose(part, out.logp[:, some], atol=1e-5)
    out.logp[mask].sum().backward()
    assert policy.module.lm_head.weight.grad is not None


def test_rollout_in_chunks_of_whole_groups(tokenizer):
    policy = make(tokenizer, rollout_batch_size=2, max_new_tokens=12)
    rollout = policy.rollout(PROMPTS, group_size=2)  # two generate calls with different prompt widths
    assert rollout.logp_old.shape == (4, 12)
    cols = trained_columns(rollout)
    out = policy.log_prob(rollout, cols, with_reference=False)
    assert (out.logp - rollout.logp_old[:, cols])[rollout.step_mask[:, cols]].abs().max() < 1e-5
    with pytest.raises(ConfigError, match="rollout_batch_size"):
        make(tokenizer, rollout_batch_size=3).rollout(PROMPTS, group_size=2)


@pytest.mark.parametrize("stops", [STOP, ["<|endoftext|>"]])
def test_constrained_completions_decode_to_the_prompt_graph(tokenizer, stops):
    smiles = ["CCO", "O=C(O)c1ccccc1", "CC(C)(C)N", "N#CC1CC1"]  # branches and rings, one batch
    policy = make(tokenizer, constrained=True, stop_tokens=stops, max_new_tokens=320, temperature=0.8)
    rollout = policy.rollout([Prompt(i, f"[SMILES]{s}[/SMILES]") for i, s in enumerate(smiles)], group_size=2)
    coordinate = {tokenizer.convert_tokens_to_ids(c) for c in "0123456789-."}
    for i, text in enumerate(rollout.info["completions"]):
        assert text.startswith("[CONFORMER]") and text.endswith("[/CONFORMER]")
        mol = decode(text.removeprefix("[CONFORMER]").removesuffix("[/CONFORMER]"))
        assert same_graph(Chem.MolToSmiles(mol), smiles[i // 2])
    # only sampled coordinate characters train; forced topology, tags and stop tokens do not
    ids, mask = rollout.payload["completion_ids"], rollout.payload["completion_mask"]
    assert set(ids[rollout.step_mask].tolist()) <= coordinate
    assert (rollout.step_mask <= mask).all() and (mask.sum(1) < 320).all()
    assert ids[torch.arange(8), mask.sum(1) - 1].eq(tokenizer.convert_tokens_to_ids(stops[0])).all()
    cols = trained_columns(rollout)
    out = policy.log_prob(rollout, cols, with_reference=False)
    assert (out.logp - rollout.logp_old[:, cols])[rollout.step_mask[:, cols]].abs().max() < 1e-5


def test_constrained_decoding_refuses_coordinate_stop_tokens_and_bad_prompts(tokenizer):
    with pytest.raises(ConfigError, match="stop_tokens"):
        make(tokenizer, constrained=True, stop_tokens=[">"])
    with pytest.raises(ValueError, match=r"\[SMILES\]<smiles>\[/SMILES\]"):
        make(tokenizer, constrained=True).rollout([Prompt(0, "CCO")], group_size=1)


def test_lora_reference_is_the_base_model_with_the_adapter_disabled(tokenizer):
    torch.manual_seed(0)
    base = build_model(len(tokenizer), **{k: v for k, v in TINY.items() if k != "init"})
    base_copy = {k: v.clone() for k, v in base.state_dict().items()}
    policy = Qwen3Policy(tokenizer, base, stop_tokens=STOP, max_new_tokens=16, lora=LORA)
    trainable = [n for n, p in policy.module.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert set(policy.state_dict()) == set(trainable)  # an adapter run checkpoints the adapters only
    rollout = policy.rollout(PROMPTS, group_size=2)
    mask, cols = rollout.step_mask, torch.arange(16)
    before = policy.log_prob(rollout, cols, with_reference=True)
    assert torch.allclose(before.logp, before.ref_logp, atol=1e-6)  # B = 0: adapter is a no-op at start
    assert (before.ref_logp - rollout.logp_old)[mask].abs().max() < 1e-5
    with torch.no_grad():  # an "update": the adapter now changes the model
        for name, param in policy.module.named_parameters():
            if "lora_B" in name:
                param.normal_()
    after = policy.log_prob(rollout, cols, with_reference=True)
    assert (after.logp - after.ref_logp)[mask].abs().max() > 1e-3
    assert torch.allclose(after.ref_logp, before.ref_logp, atol=1e-6)
    plain = make(tokenizer, model=build_model(len(tokenizer), **{k: v for k, v in TINY.items() if k != "init"}),
                 max_new_tokens=16)
    plain.module.load_state_dict(base_copy)
    assert torch.allclose(plain.log_prob(rollout, cols, False).logp, after.ref_logp, atol=1e-6)
    assert after.ref_logp.grad_fn is None


def test_frozen_reference_without_lora(tokenizer):
    policy = make(tokenizer, frozen_reference=True, max_new_tokens=10)
    rollout = policy.rollout(PROMPTS, group_size=2)
    start = policy.log_prob(rollout, torch.arange(10), with_reference=True)
    with torch.no_grad():
        policy.module.lm_head.weight.add_(0.5 * torch.randn_like(policy.module.lm_head.weight))
    moved = policy.log_prob(rollout, torch.arange(10), with_reference=True)
    assert torch.allclose(moved.ref_logp, start.logp.detach(), atol=1e-6)
    assert (moved.logp - moved.ref_logp)[rollout.step_mask].abs().max() > 1e-3
    with pytest.raises(ConfigError, match="frozen_reference"):
        make(tokenizer).log_prob(rollout, torch.arange(10), with_reference=True)


def test_supervised_loss_is_next_token_cross_entropy_on_shifted_labels(tokenizer):
    policy = make(tokenizer)
    ids = torch.tensor([tokenizer.encode("[SMILES]CCO[/SMILES][CONFORMER]", add_special_tokens=False)])
    labels = torch.full_like(ids, -100)
    labels[0, :-1] = ids[0, 1:]  # 3DMolGen's loader: labels[i] is the token after position i
    labels[0, :2] = -100  # no target there
    loss, metrics = policy.supervised_loss({"input_ids": ids, "labels": labels})
    logp = torch.log_softmax(policy.module(input_ids=ids).logits[0], dim=-1)
    targets = [(i, int(labels[0, i])) for i in range(ids.shape[1]) if labels[0, i] != -100]
    expected = -torch.stack([logp[i, t] for i, t in targets]).mean()
    assert torch.allclose(loss, expected, atol=1e-6)
    assert metrics == {"num_samples": 1.0, "num_tokens": float(ids.shape[1]), "target_tokens": float(len(targets))}
    loss.backward()
    assert policy.module.model.embed_tokens.weight.grad is not None


def test_checkpoint_starts_from_full_or_adapter_weights(tokenizer, tmp_path):
    source = make(tokenizer, seed=1, max_new_tokens=8)
    rollout = source.rollout(PROMPTS, group_size=1)
    torch.save({"model": source.state_dict(), "step": torch.tensor(3)}, tmp_path / "full.pth")
    loaded = make(tokenizer, seed=2, checkpoint=str(tmp_path / "full.pth"), max_new_tokens=8)
    cols = torch.arange(8)
    assert torch.allclose(loaded.log_prob(rollout, cols, False).logp, source.log_prob(rollout, cols, False).logp)
    # full weights under a new LoRA run: loaded into the base before the adapters are added
    with_lora = make(tokenizer, seed=2, checkpoint=str(tmp_path / "full.pth"), lora=LORA, max_new_tokens=8)
    assert torch.allclose(with_lora.log_prob(rollout, cols, True).ref_logp, source.log_prob(rollout, cols, False).logp)
    # an adapter run's checkpoint (adapter weights only) restores the adapters
    adapted = make(tokenizer, seed=1, lora=LORA, max_new_tokens=8)
    with torch.no_grad():
        for name, param in adapted.module.named_parameters():
            if "lora_B" in name:
                param.normal_()
    torch.save(adapted.state_dict(), tmp_path / "adapter.pth")
    resumed = make(tokenizer, seed=1, lora=LORA, checkpoint=str(tmp_path / "adapter.pth"), max_new_tokens=8)
    assert torch.allclose(resumed.log_prob(rollout, cols, False).logp, adapted.log_prob(rollout, cols, False).logp)
    with pytest.raises(ConfigError, match="checkpoint"):
        make(tokenizer, checkpoint=str(tmp_path / "missing.pth"))
    with pytest.raises(ConfigError, match="checkpoint"):
        make(tokenizer, model={**TINY, "hidden_size": 16, "head_dim": 4}, checkpoint=str(tmp_path / "full.pth"))


@pytest.mark.parametrize("lora", [None, LORA])
def test_export_loads_with_auto_classes_and_decodes_the_same_tokens(tokenizer, tmp_path, lora):
    policy = make(tokenizer, do_sample=False, max_new_tokens=20, lora=lora)
    if lora:
        with torch.no_grad():
            for name, param in policy.module.named_parameters():
                if "lora_B" in name:
                    param.normal_()
    rollout = policy.rollout(PROMPTS, group_size=1)
    policy.save_pretrained(str(tmp_path))
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    exported = AutoTokenizer.from_pretrained(tmp_path)
    assert exported.get_vocab() == tokenizer.get_vocab() and exported.padding_side == "left"
    for row, prompt in enumerate(PROMPTS):
        enc = exported(prompt.text, return_tensors="pt", add_special_tokens=False)
        out = model.generate(**enc, do_sample=False, max_new_tokens=20)[0, enc["input_ids"].shape[1]:]
        mask = rollout.payload["completion_mask"][row]
        assert out[:int(mask.sum())].tolist() == rollout.payload["completion_ids"][row][mask].tolist()


def test_bad_sampling_keys_are_named(tokenizer):
    for kwargs, key in [(dict(temperature=0.0), "temperature"), (dict(top_p=1.5), "top_p"), (dict(top_k=-1), "top_k"),
                        (dict(max_new_tokens=0), "max_new_tokens"), (dict(precision=0), "precision"),
                        (dict(stop_tokens=["[C]<"]), "stop_tokens"), (dict(do_sample="no"), "do_sample"),
                        (dict(frozen_reference=True, lora=LORA), "frozen_reference"),
                        (dict(model=build_model(50, **{k: v for k, v in TINY.items() if k != "init"})), "model")]:
        with pytest.raises(ConfigError, match=f"invalid config value {key}="):
            make(tokenizer, **kwargs)
    with pytest.raises(TypeError, match="prompt_id and text"):
        make(tokenizer).rollout(["[SMILES]C[/SMILES]"], group_size=1)


def test_one_grpo_update_through_the_engine(tokenizer):
    """The engine's replayed update (micro-batches of whole groups, chunks of columns, k3 KL to the
    adapter-disabled reference) trains only the adapters, at zero drift from the recorded log-probs."""
    from elign.engine.distributed import DistInfo
    from elign.engine.strategies.grpo import GRPOStrategy
    from elign.engine.updates import GradientSync, OptimizerStep, ReplayedUpdate

    policy = make(tokenizer, lora=LORA, max_new_tokens=12)
    rollout = policy.rollout(PROMPTS, group_size=2)
    params = [p for p in policy.module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    step = OptimizerStep(params, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0), 1.0, None)
    update = ReplayedUpdate(policy, GRPOStrategy(beta=0.04), step, DistInfo(0, 1, 0, torch.device("cpu")),
                            GradientSync(), micro_batch_size=2, step_chunk_size=5, grad_accum_steps=None,
                            inner_epochs=1, old_logp="rollout", group_size=2)
    frozen = {n: p.clone() for n, p in policy.module.named_parameters() if not p.requires_grad}
    adapters = {n: p.clone() for n, p in policy.module.named_parameters() if p.requires_grad}
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5]).unsqueeze(1).expand(4, 12)
    metrics = update(rollout, advantages)
    assert metrics["train/logp_drift"] < 1e-5 and metrics["train/kl"] == pytest.approx(0.0, abs=1e-6)
    assert step.count == 1
    named = dict(policy.module.named_parameters())
    assert all(torch.equal(named[n], p) for n, p in frozen.items())
    assert any(not torch.equal(named[n], p) for n, p in adapters.items())


@pytest.mark.parametrize("name", ["qwen3_tiny_random", "qwen3_06b_hf"])
def test_model_yamls_bind_to_their_targets(name):
    import inspect
    from pathlib import Path

    from omegaconf import OmegaConf

    from molgen_grpo.tokenizer import load_tokenizer as loader

    cfg = OmegaConf.load(Path(__file__).resolve().parents[2] / "conf" / "model" / "molgen" / f"{name}.yaml")
    assert cfg._target_ == "molgen_grpo.policy.Qwen3Policy"
    for node, target in [(cfg, Qwen3Policy), (cfg.tokenizer, loader), (cfg.model, build_model)]:
        params = set(inspect.signature(target).parameters)
        assert set(node) - {"_target_"} <= params, (name, target.__name__, set(node) - params)
    assert set(cfg) - {"_target_"} == set(inspect.signature(Qwen3Policy).parameters)  # every key is stated


def test_tiny_yaml_instantiates_a_constrained_policy():
    from pathlib import Path

    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(Path(__file__).resolve().parents[2] / "conf" / "model" / "molgen" / "qwen3_tiny_random.yaml")
    cfg.constrained, cfg.lora = True, {"r": 2, "alpha": 4, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
    torch.manual_seed(0)
    policy = instantiate(cfg)
    assert policy.module.config.hidden_size == 64 and policy.lora
    rollout = policy.rollout([Prompt(0, "[SMILES]CC#N[/SMILES]")], group_size=2)
    for text in rollout.info["completions"]:
        assert same_graph(Chem.MolToSmiles(decode(text.removeprefix("[CONFORMER]").removesuffix("[/CONFORMER]"))),
                          "CC#N")
