"""A causal LM (Qwen3 via transformers) as the engine's token policy; a step is a generated token.

Log-probabilities follow TRL's ``GRPOTrainer``: the log-prob of a token is
``log_softmax(logits / temperature)`` of the raw model, i.e. of the temperature-scaled distribution,
*before* top-k / top-p truncation and before the constrained-decoding mask. ``logp_old`` is recorded
from the sampler's own logits (KV-cache path) and :meth:`Qwen3Policy.log_prob` recomputes the same
quantity in one forward, so the two agree up to float rounding at the sampling weights.

Columns: ``T = max_new_tokens`` always (TRL's ``max_completion_length``, the normaliser of
``dr_grpo``); completions that stop earlier are padded with the pad token, and ``step_mask`` is True
on the generated tokens up to and including the first stop token. With constrained decoding, tokens
the constraint forced (one allowed token) are not trained either: their constrained probability is 1.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn
from transformers import (GenerationConfig, LogitsProcessor, LogitsProcessorList, PreTrainedModel,
                          PreTrainedTokenizerBase)

from elign.engine.checkpoint import load_checkpoint
from elign.engine.errors import ConfigError, check_int, check_range
from elign.engine.policy_state import load_trainable_state_dict, trainable_state_dict
from elign.engine.rollout import Rollout, StepLogProbs
from molgen_grpo.constrain import ConformerLogitsProcessor, CoordinateAlphabet, conformer_template, prompt_smiles
from molgen_grpo.model import build_model, wrap_lora
from molgen_grpo.sampler import KVSampler, unsupported_reason, warpers
from molgen_grpo.text import DEFAULT_PRECISION
from molgen_grpo.tokenizer import TAGS, stop_token_ids

__all__ = ["Prompt", "Qwen3Policy", "SAMPLERS", "as_prompts", "until_stop"]

SAMPLERS = ("kv", "generate")


@dataclass(frozen=True)
class Prompt:
    """One prompt: ``prompt_id`` names its GRPO group (two prompts with the same text and different
    ids are different groups); ``text`` is what the model continues, e.g. ``[SMILES]CCO[/SMILES]``;
    ``modality`` is dataset metadata a reward may read (``smiles``, ``protein``, ``dna``), or None."""

    prompt_id: int | str
    text: str
    modality: str | None = None


def as_prompts(prompts: Sequence[Prompt | Mapping[str, Any]]) -> list[Prompt]:
    """Prompts from :class:`Prompt` objects or mappings with keys ``prompt_id`` and ``text``."""
    out = []
    for item in prompts:
        if isinstance(item, Prompt):
            out.append(item)
        elif isinstance(item, Mapping) and "prompt_id" in item and "text" in item:
            out.append(Prompt(item["prompt_id"], str(item["text"]), item.get("modality")))
        else:
            raise TypeError(f"a prompt must be a Prompt or a mapping with keys prompt_id and text, got {item!r}")
    if not out:
        raise ValueError("rollout needs at least one prompt")
    return out


class _LogProbRecorder(LogitsProcessor):
    """Records ``log_softmax(scores / temperature)`` of each sampled token. First in the processor
    list, it sees the raw logits; the token sampled from step t is read at step t + 1 (``finish``
    reads the last one), so only one step's distribution is held at a time."""

    def __init__(self, temperature: float) -> None:
        self.temperature = temperature
        self.previous: Tensor | None = None
        self.values: list[Tensor] = []

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if self.previous is not None:
            self.values.append(self.previous.gather(1, input_ids[:, -1:]).squeeze(1))
        self.previous = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        return scores

    def finish(self, last_tokens: Tensor) -> Tensor:
        """``[B, T']`` log-probs of all generated tokens, given the last column of tokens ``[B]``."""
        self.values.append(self.previous.gather(1, last_tokens[:, None]).squeeze(1))
        return torch.stack(self.values, dim=1)


class Qwen3Policy:
    """Sampler and differentiable token log-probabilities of a causal LM (the engine's ``Policy``).

    Args:
        tokenizer: from :func:`molgen_grpo.tokenizer.load_tokenizer` (its padding side is forced to
            left for generation).
        model: keyword arguments of :func:`molgen_grpo.model.build_model` (``init: random |
            pretrained``, dims...; the vocabulary size comes from the tokenizer), or a built model.
        stop_tokens: strings that end a completion, each one token (e.g. ``[/CONFORMER]``).
        max_new_tokens: ``T``, the most tokens a completion has (TRL's ``max_completion_length``).
        do_sample: sample (True) or decode greedily.
        temperature: > 0; scales the logits for sampling and for every log-prob (TRL).
        top_p: nucleus sampling mass in (0, 1]; 1 = off.
        top_k: keep the k most likely tokens; 0 = off.
        constrained: force the prompt's topology and sample only coordinates
            (:mod:`molgen_grpo.constrain`); prompts must be ``[SMILES]…[/SMILES]``.
        precision: decimals of each constrained coordinate.
        max_integer_digits: integer digits a constrained coordinate may have.
        lora: None (train all weights) or ``{r, alpha, dropout, target_modules}``; with LoRA the
            KL reference is the same model with the adapter disabled.
        frozen_reference: without LoRA, keep a frozen copy of the starting weights for the KL
            (needed when the strategy's ``beta > 0``); must be false with LoRA.
        checkpoint: a run checkpoint (``model`` entry) or a state dict to start from: full weights
            (loaded before LoRA is added) or a LoRA run's adapter weights; None = as built.
        rollout_batch_size: completions generated per ``generate`` call (a multiple of the group
            size, so no group is split); None = all at once.
        mask_truncated_completions: TRL's option: a completion cut at ``max_new_tokens`` without a
            stop token keeps its reward (and its place in the group statistics) but trains no token.
        sampler: ``kv`` (:class:`molgen_grpo.sampler.KVSampler`: the same tokens as ``generate`` for
            a seed, several times faster on small models; Qwen3 / Qwen2 / Llama layouts) or
            ``generate`` (transformers' ``generate``, any causal LM).
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        model: Mapping[str, Any] | PreTrainedModel,
        stop_tokens: Sequence[str],
        max_new_tokens: int,
        do_sample: bool = True,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        constrained: bool = False,
        precision: int = DEFAULT_PRECISION,
        max_integer_digits: int = 3,
        lora: Mapping[str, Any] | None = None,
        frozen_reference: bool = False,
        checkpoint: str | None = None,
        rollout_batch_size: int | None = None,
        mask_truncated_completions: bool = False,
        sampler: str = "kv",
    ) -> None:
        self.tokenizer = tokenizer
        tokenizer.padding_side = "left"
        self.stop_ids = stop_token_ids(tokenizer, list(stop_tokens))
        self.pad_id = int(tokenizer.pad_token_id)
        self.max_new_tokens = check_int("max_new_tokens", max_new_tokens, 1)
        self.do_sample = _flag("do_sample", do_sample)
        self.temperature = check_range("temperature", temperature, 0.0, low_open=True)
        self.top_p = check_range("top_p", top_p, 0.0, 1.0, low_open=True)
        self.top_k = check_int("top_k", top_k, 0, allowed="an integer >= 0 (0 = off)")
        self.constrained = _flag("constrained", constrained)
        self.precision = check_int("precision", precision, 1)
        self.max_integer_digits = check_int("max_integer_digits", max_integer_digits, 1)
        self.rollout_batch_size = check_int("rollout_batch_size", rollout_batch_size, 1, allow_none=True,
                                            allowed="null or a positive multiple of the group size")
        self.mask_truncated = _flag("mask_truncated_completions", mask_truncated_completions)
        self.alphabet = CoordinateAlphabet(tokenizer) if self.constrained else None
        if self.alphabet is not None and set(self.stop_ids) & self.alphabet.ids:
            raise ConfigError("stop_tokens", list(stop_tokens), "tokens other than the coordinate characters "
                                                                "0-9 - . , < > (constrained decoding samples them)")
        if _flag("frozen_reference", frozen_reference) and lora is not None:
            raise ConfigError("frozen_reference", frozen_reference,
                              "false with lora (the KL reference is the model with the adapter disabled)")
        base = model if isinstance(model, nn.Module) else build_model(len(tokenizer), **dict(model))
        rows = base.get_input_embeddings().weight.shape[0]
        if rows < len(tokenizer):
            raise ConfigError("model", type(base).__name__, f"a model with at least len(tokenizer)={len(tokenizer)} "
                                                            f"embedding rows (it has {rows})")
        base.generation_config = self._generation_config()  # no sampling default from a Hub file
        state, adapter = self._read_checkpoint(checkpoint)
        if state is not None and not adapter:
            self._load(base.load_state_dict, state, checkpoint)
        if sampler not in SAMPLERS:
            raise ConfigError("sampler", sampler, SAMPLERS)
        if sampler == "kv" and (reason := unsupported_reason(base)) is not None:
            raise ConfigError("sampler", sampler, f"generate for this model ({reason})")
        self.sampler = sampler
        self.lora = lora is not None
        self.module: nn.Module = wrap_lora(base, lora) if self.lora else base
        if adapter:
            self._load(self.load_state_dict, state, checkpoint)
        # The KL anchor is the starting point of fine-tuning, so it is copied after loading.
        self.reference = copy.deepcopy(base).eval().requires_grad_(False) if frozen_reference else None
        self._forward: nn.Module = self.module

    # ------------------------------------------------------------------ engine protocol

    def distribute(self, wrap: Callable[[nn.Module], nn.Module]) -> None:
        """Route the differentiable forwards (``log_prob``, ``supervised_loss``) through ``wrap(module)``."""
        self._forward = wrap(self.module)

    def to(self, device: torch.device | str) -> "Qwen3Policy":
        self.module.to(device)
        if self.reference is not None:
            self.reference.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    @torch.no_grad()
    def rollout(self, prompts: Sequence[Prompt | Mapping[str, Any]], group_size: int) -> Rollout:
        """Sample ``group_size`` completions per prompt (consecutive rows form a group).

        Returns:
            A :class:`Rollout` with ``B = P * K``, ``T = max_new_tokens``; ``group_ids [B]`` index the
            distinct ``prompt_id``s in order of appearance; payload ``prompt_ids [B, Lp]`` (left
            padded), ``prompt_mask [B, Lp]``, ``completion_ids [B, T]`` (pad after the end) and
            ``completion_mask [B, T]`` (generated tokens up to and including the first stop);
            info ``completions`` (decoded text, special tokens skipped), ``prompts``, ``prompt_ids``
            (the given ids, per sample), ``metrics`` (TRL's ``completions/*``) and ``counters``
            (``num_tokens``: prompt + completion tokens, which the trainer totals as TRL's ``num_tokens``).
        """
        k = check_int("group_size", group_size, 1)
        items = as_prompts(prompts)
        chunk = self.rollout_batch_size
        if chunk is not None and chunk % k:
            raise ConfigError("rollout_batch_size", chunk, f"a positive multiple of the group size K={k}")
        per_call = len(items) if chunk is None else chunk // k
        was_training = self.module.training
        self.module.eval()
        try:
            sampler = KVSampler(self.module) if self.sampler == "kv" else None  # one weight snapshot per rollout
            parts = [self._generate(items[i:i + per_call], k, sampler) for i in range(0, len(items), per_call)]
        finally:
            self.module.train(was_training)
        width = max(p["prompt_ids"].shape[1] for p in parts)
        for part in parts:  # left-pad every chunk's prompts to the widest
            extra = width - part["prompt_ids"].shape[1]
            part["prompt_ids"] = nn.functional.pad(part["prompt_ids"], (extra, 0), value=self.pad_id)
            part["prompt_mask"] = nn.functional.pad(part["prompt_mask"], (extra, 0), value=0)
        payload = {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
        logp, step_mask = payload.pop("logp"), payload.pop("step_mask")
        keys = list(dict.fromkeys(p.prompt_id for p in items))
        group_ids = torch.tensor([keys.index(p.prompt_id) for p in items], device=logp.device).repeat_interleave(k)
        texts = [self.tokenizer.decode(ids[m].tolist(), skip_special_tokens=True)
                 for ids, m in zip(payload["completion_ids"], payload["completion_mask"])]
        metrics = self._metrics(payload["completion_ids"], payload["completion_mask"])
        tokens = float(payload["prompt_mask"].sum() + payload["completion_mask"].sum())
        return Rollout(group_ids=group_ids, logp_old=logp, step_mask=step_mask, payload=payload,
                       info={"completions": texts, "prompts": [p.text for p in items for _ in range(k)],
                             "prompt_ids": [p.prompt_id for p in items for _ in range(k)],
                             "modalities": [p.modality for p in items for _ in range(k)], "metrics": metrics,
                             "counters": {"num_tokens": tokens}})

    def log_prob(self, rollout: Rollout, steps: Tensor, with_reference: bool) -> StepLogProbs:
        """Log-probs ``[b, t]`` of the completion tokens at columns ``steps`` (``[t]`` long), with
        gradients, from one forward over prompt + completion up to the last column asked; with
        ``with_reference``, also the reference policy's (no grad)."""
        steps = steps.to(self.device).long().reshape(-1)
        inputs = self._inputs(rollout.payload, steps)
        logp = self._token_log_probs(self._forward, inputs, rollout.payload, steps)
        if not with_reference:
            return StepLogProbs(logp=logp)
        with torch.no_grad():
            if self.lora:
                with self.module.disable_adapter():
                    ref = self._token_log_probs(self.module, inputs, rollout.payload, steps)
            elif self.reference is not None:
                ref = self._token_log_probs(self.reference, inputs, rollout.payload, steps)
            else:
                raise ConfigError("frozen_reference", False, "true (or a lora config) when the strategy's KL "
                                                             "(beta > 0) needs reference log-probs")
        return StepLogProbs(logp=logp, ref_logp=ref)

    def supervised_loss(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        """Next-token cross-entropy (pretraining / SFT), mean over the target tokens.

        Args:
            batch: ``input_ids [B, L]``; ``labels [B, L]`` already shifted, as 3DMolGen's packing
                loader writes them (``labels[:, i]`` is the token after position ``i``; -100 = no
                target); optional ``attention_mask [B, L]`` (0 = padding; default all ones).
        """
        device = self.device
        ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
        if labels.shape != ids.shape:
            raise ValueError(f"labels {tuple(labels.shape)} must have the shape of input_ids {tuple(ids.shape)}")
        mask = batch.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask.to(device)
        logits = self._forward(input_ids=ids, attention_mask=mask, position_ids=_positions(mask),
                               use_cache=False).logits
        loss = nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
        return loss, {"num_samples": float(ids.shape[0]), "num_tokens": float(mask.sum()),
                      "target_tokens": float((labels != -100).sum())}

    @staticmethod
    def supervised_weight(batch: Mapping[str, Tensor]) -> int:
        """Target tokens of a batch, the count :meth:`supervised_loss` averages over: the engine
        weights accumulated batches and ranks by it, so a step is the global token mean."""
        return int((batch["labels"] != -100).sum())

    # ------------------------------------------------------------------ checkpoints and export

    def state_dict(self) -> dict[str, Tensor]:
        """What a run checkpoint stores: the adapter weights with LoRA, else the whole model."""
        return trainable_state_dict(self.module) if self.lora else self.module.state_dict()

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        if self.lora:
            load_trainable_state_dict(self.module, dict(state))
        else:
            self.module.load_state_dict(state)

    def save_pretrained(self, directory: str) -> None:
        """Write a Hugging Face model directory (LoRA merged into a copy) plus the tokenizer, so
        ``AutoModelForCausalLM.from_pretrained(directory)`` loads the current policy."""
        model = copy.deepcopy(self.module).merge_and_unload() if self.lora else self.module
        model.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)

    # ------------------------------------------------------------------ internals

    def _metrics(self, completion: Tensor, mask: Tensor) -> dict[str, float]:
        """TRL's ``completions/*``: lengths (stop token included) and the share cut at ``T``."""
        lengths = mask.sum(1).double()
        stopped = (torch.isin(completion, torch.tensor(self.stop_ids, device=mask.device)) & mask).any(1)
        return {"completions/mean_length": float(lengths.mean()), "completions/min_length": float(lengths.min()),
                "completions/max_length": float(lengths.max()),
                "completions/clipped_ratio": float((~stopped).double().mean())}

    def _generation_config(self) -> GenerationConfig:
        sampling = dict(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k) if self.do_sample else {}
        return GenerationConfig(do_sample=self.do_sample, max_new_tokens=self.max_new_tokens, num_beams=1,
                                eos_token_id=list(self.stop_ids), pad_token_id=self.pad_id, use_cache=True, **sampling)

    def _generate(self, items: list[Prompt], k: int, sampler: KVSampler | None) -> dict[str, Tensor]:
        """Generate ``k`` completions for each of ``items`` (with ``sampler``, else transformers'
        ``generate``); tensors padded to ``T`` columns."""
        texts = [p.text for p in items for _ in range(k)]
        enc = self.tokenizer(texts, padding=True, add_special_tokens=False, return_tensors="pt").to(self.device)
        processors: list[LogitsProcessor] = []
        constraint = None
        if self.constrained:
            end = self.tokenizer.convert_tokens_to_ids(TAGS[3])
            tail = [end] if end in self.stop_ids else [end, self.stop_ids[0]]
            templates = {p.text: conformer_template(prompt_smiles(p.text), self.tokenizer, self.alphabet, tail)
                         for p in items}
            constraint = ConformerLogitsProcessor([templates[t] for t in texts], self.alphabet, self.precision,
                                                  self.max_integer_digits, self.pad_id)
            processors.append(constraint)
        if sampler is not None:
            if self.do_sample:
                processors += warpers(self.temperature, self.top_k, self.top_p)
            completion, logp = sampler.generate(
                enc["input_ids"], enc["attention_mask"], self.max_new_tokens, processors, self.do_sample,
                self.stop_ids, self.pad_id, self.temperature)
        else:
            recorder = _LogProbRecorder(self.temperature)
            sequences = self.module.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                                             generation_config=self._generation_config(),
                                             logits_processor=LogitsProcessorList([recorder, *processors]))
            completion = sequences[:, enc["input_ids"].shape[1]:]
            logp = recorder.finish(completion[:, -1])  # max_new_tokens >= 1: at least one column
        generated = completion.shape[1]
        mask = until_stop(completion, self.stop_ids)
        step_mask = mask.clone()
        if self.mask_truncated:
            stopped = (torch.isin(completion, torch.tensor(self.stop_ids, device=mask.device)) & mask).any(1)
            step_mask &= stopped.unsqueeze(1)
        if constraint is not None:
            step_mask &= ~torch.stack(constraint.forced, dim=1).to(mask.device)[:, :generated]
        pad = self.max_new_tokens - generated
        completion = torch.where(mask, completion, torch.full_like(completion, self.pad_id))
        return {
            "prompt_ids": enc["input_ids"], "prompt_mask": enc["attention_mask"],
            "completion_ids": nn.functional.pad(completion, (0, pad), value=self.pad_id),
            "completion_mask": nn.functional.pad(mask, (0, pad), value=False),
            "step_mask": nn.functional.pad(step_mask, (0, pad), value=False),
            "logp": nn.functional.pad(torch.where(mask, logp.to(mask.device), torch.zeros_like(logp)), (0, pad)),
        }

    def _inputs(self, payload: Mapping[str, Tensor], steps: Tensor) -> dict[str, Tensor]:
        """Prompt + completion up to (not including) the last asked column: the logits at position
        ``Lp - 1 + j`` predict completion column ``j``."""
        prompt, prompt_mask = payload["prompt_ids"].to(self.device), payload["prompt_mask"].to(self.device)
        last = int(steps.max()) if steps.numel() else 0
        completion = payload["completion_ids"][:, :last].to(self.device)
        ids = torch.cat([prompt, completion], dim=1)
        # Generation attends to every generated token (pads after a stop included): so do we.
        mask = torch.cat([prompt_mask, torch.ones_like(completion)], dim=1)
        return {"input_ids": ids, "attention_mask": mask, "position_ids": _positions(mask),
                "logits_to_keep": prompt.shape[1] - 1 + steps}

    def _token_log_probs(self, forward: nn.Module, inputs: dict[str, Tensor], payload: Mapping[str, Tensor],
                         steps: Tensor) -> Tensor:
        logits = forward(**inputs, use_cache=False).logits.float() / self.temperature  # [b, t, V]
        tokens = payload["completion_ids"].to(self.device)[:, steps]
        return logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)

    @staticmethod
    def _read_checkpoint(path: str | None) -> tuple[dict[str, Tensor] | None, bool]:
        """The state dict in ``path`` and whether it holds LoRA adapter weights."""
        if path is None:
            return None, False
        try:
            obj = load_checkpoint(path)
        except (FileNotFoundError, RuntimeError) as err:
            raise ConfigError("checkpoint", path, f"null or a readable checkpoint file ({err})") from None
        state = obj["model"] if isinstance(obj, dict) and isinstance(obj.get("model"), dict) else obj
        if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
            raise ConfigError("checkpoint", path, "null or a file holding a state dict (or a run checkpoint's 'model')")
        return state, any("lora_" in key for key in state)

    @staticmethod
    def _load(load: Callable[[Any], Any], state: dict[str, Tensor], path: str | None) -> None:
        try:
            load(state)
        except (KeyError, RuntimeError) as err:
            first = str(err).strip().splitlines()[0][:200]
            raise ConfigError("checkpoint", path, f"weights of this model (and lora) configuration ({first})") from None


def _flag(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(key, value, "true or false")
    return value


def until_stop(completion: Tensor, stop_ids: Sequence[int]) -> Tensor:
    """``[B, T]`` bool: True on each row's tokens up to and including its first stop token (all of
    them if it has none)."""
    is_stop = torch.isin(completion, torch.tensor(list(stop_ids), device=completion.device)).long()
    return (torch.cumsum(is_stop, dim=1) - is_stop) == 0  # no stop strictly before the position


def _positions(mask: Tensor) -> Tensor:
    """Position ids of a left-padded batch, as ``generate`` computes them (pads get 0)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0) * mask.long()
