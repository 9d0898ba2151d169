"""Masked language models for the MLM reward: any transformers ``AutoModelForMaskedLM``, or the shipped tiny one.

:func:`load_masked_lm` opens a local folder or a Hub id (ModernBERT, on which UME is built; ESM-2;
ChemBERTa-style; nucleotide models) with ``AutoModelForMaskedLM`` / ``AutoTokenizer``. The project's own model
(``molgen_grpo/weights/mlm_tiny``, trained by ``python -m molgen_grpo.mlm_train``) is a small ModernBERT with a
character tokenizer and one CLS token per modality (``<cls_smiles>``, ``<cls_protein>``, ``<cls_dna>``), as UME
prefixes each sequence with its modality's CLS token; it is saved with ``save_pretrained`` and loads through
the same function.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from elign.engine.errors import ConfigError
from elign.engine.paths import resolve_package_path

PAD, UNK, MASK, EOS = "<pad>", "<unk>", "<mask>", "<eos>"
MODALITY_TOKENS = {"smiles": "<cls_smiles>", "protein": "<cls_protein>", "dna": "<cls_dna>"}
SPECIALS = (PAD, UNK, MASK, EOS, *MODALITY_TOKENS.values())


def build_char_tokenizer(texts: Iterable[str]) -> Any:
    """A character-level ``PreTrainedTokenizerFast`` over the characters of ``texts`` plus :data:`SPECIALS`;
    every encoding ends with ``<eos>`` (the modality token is put in front by the scorer / trainer)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = sorted({c for text in texts for c in text if not c.isspace()})
    vocab = {tok: i for i, tok in enumerate([*SPECIALS, *chars])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"\S"), behavior="isolated")
    core.post_processor = processors.TemplateProcessing(single=f"$A {EOS}", special_tokens=[(EOS, vocab[EOS])])
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token=PAD, unk_token=UNK, mask_token=MASK,
                                   eos_token=EOS, additional_special_tokens=list(MODALITY_TOKENS.values()),
                                   padding_side="right")


def build_tiny_mlm(vocab_size: int, pad_token_id: int, hidden_size: int = 64, num_layers: int = 2,
                   num_heads: int = 4, intermediate_size: int = 128, max_positions: int = 512, seed: int = 0) -> Any:
    """A randomly initialised ``ModernBertForMaskedLM`` at small dimensions (eager attention: CPU)."""
    import torch
    from transformers import ModernBertConfig, ModernBertForMaskedLM

    config = ModernBertConfig(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
                              num_attention_heads=num_heads, intermediate_size=intermediate_size,
                              max_position_embeddings=max_positions, pad_token_id=pad_token_id,
                              bos_token_id=pad_token_id, eos_token_id=pad_token_id, cls_token_id=pad_token_id,
                              sep_token_id=pad_token_id, local_attention=max_positions,
                              attn_implementation="sdpa")
    torch.manual_seed(seed)
    return ModernBertForMaskedLM(config)


def load_masked_lm(path: str, trust_remote_code: bool = False, device: str = "cpu") -> tuple[Any, Any]:
    """``(model, tokenizer)`` from a local folder (``package:`` paths resolve inside the repo) or a Hub id.

    Raises:
        ConfigError: the folder or id cannot be opened as a masked LM (names ``path`` and the cause).
    """
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    resolved = resolve_package_path(path)
    if Path(str(resolved)).exists() and not (Path(str(resolved)) / "config.json").is_file():
        raise ConfigError("path", path, "a folder with config.json (save_pretrained) or a Hub model id")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(resolved), trust_remote_code=trust_remote_code)
        model = AutoModelForMaskedLM.from_pretrained(str(resolved), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ConfigError("path", path, f"a masked LM folder or Hub id ({type(exc).__name__}: {exc})") from None
    return model.to(device).eval(), tokenizer
