"""The masked-LM reward function plugged into TRL's own GRPOTrainer: two training steps on a tiny Qwen3 over the
shipped prompt dataset, the dataset's modality column reaching the reward, TRL logging it under its name."""

from __future__ import annotations

import pytest

pytest.importorskip("trl")

import torch  # noqa: E402

from molgen_grpo.mlm_prompts import read_rows  # noqa: E402
from molgen_grpo.mlm_reward import MaskedLMRewardFunction  # noqa: E402


def char_tokenizer(texts):
    """A character-level causal-LM tokenizer over ``texts`` (pad = eos, left padding as TRL generates)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(["<eos>", "<unk>", *sorted({c for t in texts for c in t})])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()  # characters back into text, without separators
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", pad_token="<eos>", unk_token="<unk>",
                                   padding_side="left")


def test_two_grpo_trainer_steps_with_the_masked_lm_reward(tmp_path):
    from datasets import Dataset
    from transformers import Qwen3Config, Qwen3ForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    rows = [r for r in read_rows("package:molgen_grpo/data/mlm_prompts/train.json")][:8]
    tokenizer = char_tokenizer([r["prompt"] for r in rows] + ["<>/ACGTMKV()=#1cno"])
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(Qwen3Config(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                         intermediate_size=64, max_position_embeddings=512,
                                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    reward = MaskedLMRewardFunction(path="package:molgen_grpo/weights/mlm_tiny", sources=["tags", "metadata"])
    seen = []
    original = reward.score.__call__

    def spy(completions, metadata=None):
        seen.append(list(metadata))
        return original(completions, metadata)

    reward.score = spy
    args = GRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, max_steps=2, per_device_train_batch_size=4,
                      num_generations=2, max_completion_length=12, learning_rate=1e-3, report_to="none",
                      save_strategy="no", logging_steps=1)
    trainer = GRPOTrainer(model=model, processing_class=tokenizer, reward_funcs=reward, args=args,
                          train_dataset=Dataset.from_list([{"prompt": r["prompt"], "modality": r["modality"]}
                                                           for r in rows]))
    before = [p.detach().clone() for p in model.parameters()]
    trainer.train()
    assert trainer.state.global_step == 2
    logged = [h for h in trainer.state.log_history if "rewards/mlm_unmasked_mean/mean" in h]
    assert len(logged) == 2 and all(isinstance(h["rewards/mlm_unmasked_mean/mean"], float) for h in logged)
    # The dataset's modality column arrived as metadata: untagged completions were scored as their modality.
    assert seen and all(m in ("smiles", "protein", "dna") for batch in seen for m in batch)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
