"""Our GRPO loss and gradients on a real tiny Qwen3 equal those of TRL's own ``GRPOTrainer``.

One rollout of :class:`Qwen3Policy` (same prompt length for every prompt: see the note below), fixed
advantages, behaviour log-probs shifted so ratios fall on both sides of the clip, and reference
log-probs for the KL. Ours: ``Qwen3Policy.log_prob`` -> ``GRPOStrategy.loss``. TRL's: a real
``GRPOTrainer`` built around a copy of the same weights, whose ``compute_loss`` runs its own forward
(TRL's fused LM head with its temperature) on the same token ids. Losses and every parameter's
gradient must agree, for every loss type, both importance-sampling levels, with and without the KL
(TRL's defaults: the KL multiplied by the importance weight, ``use_bias_correction_kl``).

Left padding: TRL's scoring forward passes no ``position_ids``, so a left-padded prompt is scored at
positions shifted by its pad count, while generation used mask-aware positions (transformers
``generate``); our policy scores at the generation's positions. The two therefore agree exactly
only when no prompt is padded, which this test arranges.
"""

from __future__ import annotations

import copy

import pytest

pytest.importorskip("trl")
pytest.importorskip("datasets")

import torch  # noqa: E402

from elign.engine.distributed import DistInfo  # noqa: E402
from elign.engine.rollout import StepLogProbs  # noqa: E402
from elign.engine.strategies.base import LossInputs  # noqa: E402
from elign.engine.strategies.grpo import GRPOStrategy  # noqa: E402
from elign.engine.updates import batch_counts  # noqa: E402
from molgen_grpo.policy import Prompt, Qwen3Policy  # noqa: E402
from molgen_grpo.tokenizer import ASSET_PATH, load_tokenizer  # noqa: E402

TINY = dict(init="random", hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=64, head_dim=8, max_position_embeddings=1024)
TEMPERATURE = 0.7
PROMPTS = [Prompt(0, "[SMILES]CCO[/SMILES]"), Prompt(1, "[SMILES]CCN[/SMILES]")]  # equal token lengths


@pytest.fixture(scope="module")
def batch():
    tokenizer = load_tokenizer(ASSET_PATH)
    torch.manual_seed(0)
    policy = Qwen3Policy(tokenizer, TINY, stop_tokens=["[/CONFORMER]", "<|endoftext|>"], max_new_tokens=12,
                         temperature=TEMPERATURE)
    rollout = policy.rollout(PROMPTS, group_size=4)
    assert bool(rollout.payload["prompt_mask"].all()), "the prompts must not be padded (module docstring)"
    mask = rollout.payload["completion_mask"]
    g = torch.Generator().manual_seed(1)
    b, t = mask.shape
    logp_old = rollout.logp_old + 0.3 * torch.randn(b, t, generator=g) * mask  # ratios on both sides of the clip
    ref_logp = rollout.logp_old + 0.2 * torch.randn(b, t, generator=g) * mask
    advantages = torch.randn(b, generator=g)
    return tokenizer, policy, rollout, logp_old, ref_logp, advantages


def our_loss(policy, rollout, logp_old, ref_logp, advantages, strategy):
    policy.module.zero_grad(set_to_none=True)
    policy.module.train()
    mask = rollout.step_mask
    steps = torch.arange(mask.shape[1])
    logp = policy.log_prob(rollout, steps, with_reference=False).logp
    dist = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    reference = StepLogProbs(logp=logp, ref_logp=ref_logp) if strategy.beta > 0 else None
    loss, _ = strategy.loss(LossInputs(logp=logp, logp_old=logp_old, advantages=advantages.unsqueeze(1).expand_as(logp),
                                       mask=mask, seq_tokens=mask.sum(1), counts=batch_counts(mask, dist),
                                       reference=reference))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in policy.module.named_parameters() if p.grad is not None}


def trl_loss(tokenizer, policy, rollout, logp_old, ref_logp, advantages, loss_type, level, eps_high, beta, tmp_path):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    model = copy.deepcopy(policy.module)  # TRL patches the model's forward: never ours
    if beta:  # TRL loads its reference model from the policy's path (unused here: the inputs carry ref log-probs)
        model.save_pretrained(tmp_path / "policy")
        model.config._name_or_path = str(tmp_path / "policy")
    b, t = rollout.step_mask.shape
    args = GRPOConfig(output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=b, num_generations=4,
                      max_completion_length=t, report_to="none", loss_type=loss_type, importance_sampling_level=level,
                      epsilon=0.2, epsilon_high=eps_high, beta=beta, temperature=TEMPERATURE, bf16=False,
                      save_strategy="no", logging_steps=1)
    trainer = GRPOTrainer(model=model, processing_class=tokenizer, args=args,
                          reward_funcs=lambda prompts, completions, **kw: [0.0] * len(prompts),
                          train_dataset=Dataset.from_dict({"prompt": [p.text for p in PROMPTS]}))
    model.train()
    trainer.current_gradient_accumulation_steps = args.gradient_accumulation_steps  # set by Trainer's loop
    mask = rollout.payload["completion_mask"].long()
    inputs = {"prompt_ids": rollout.payload["prompt_ids"], "prompt_mask": rollout.payload["prompt_mask"],
              "completion_ids": rollout.payload["completion_ids"], "completion_mask": mask,
              "advantages": advantages, "old_per_token_logps": logp_old,
              "num_items_in_batch": torch.tensor(float(mask.sum()))}
    if beta:
        inputs["ref_per_token_logps"] = ref_logp
    loss = trainer.compute_loss(model, inputs)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("level, eps_high, beta", [("token", 0.28, 0.0), ("token", 0.2, 0.04), ("sequence", 0.28, 0.04)])
def test_loss_and_gradients_equal_trl_grpo_trainer(batch, loss_type, level, eps_high, beta, tmp_path):
    tokenizer, policy, rollout, logp_old, ref_logp, advantages = batch
    strategy = GRPOStrategy(loss_type=loss_type, importance_sampling=level, epsilon_low=0.2, epsilon_high=eps_high,
                            beta=beta, kl_ratio_correction=True)  # TRL's default use_bias_correction_kl
    ours, our_grads = our_loss(policy, rollout, logp_old, ref_logp, advantages, strategy)
    theirs, their_grads = trl_loss(tokenizer, policy, rollout, logp_old, ref_logp, advantages, loss_type, level,
                                   eps_high, beta, tmp_path)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)
    assert our_grads.keys() == their_grads.keys()
    for name in our_grads:
        torch.testing.assert_close(our_grads[name], their_grads[name], rtol=1e-4, atol=1e-7, msg=name)
    assert max(g.abs().max() for g in our_grads.values()) > 1e-4  # a gradient that is there to compare
