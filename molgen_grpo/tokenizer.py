"""Tokenizers for enriched-SMILES text (spec §1.3): Qwen3's with the four 3DMolGen tags, or our own.

- :func:`load_tokenizer` loads any Hugging Face tokenizer (Qwen3's BPE from a local directory or a
  Hub id) and adds ``[SMILES]``, ``[CONFORMER]``, ``[/SMILES]``, ``[/CONFORMER]`` as ordinary
  vocabulary entries, in that order, as 3DMolGen does (on Qwen3-0.6B-Base they get 151669-151672).
  Tags that are already in the vocabulary keep their ids.
- :func:`build_tokenizer` builds an offline tokenizer over the enriched-SMILES alphabet with the
  ``tokenizers`` library; ``python -m molgen_grpo.tokenizer --out DIR`` writes one, and the copy
  shipped in ``molgen_grpo/assets/tokenizer`` (its README gives the command) is what
  ``load_tokenizer("package:molgen_grpo/assets/tokenizer")`` reads.

The built tokenizer has a fixed id layout: 0 ``<|endoftext|>`` (pad and eos, as in Qwen),
1 ``[SMILES]``, 2 ``[CONFORMER]``, 3 ``[/SMILES]``, 4 ``[/CONFORMER]``, 5 ``<|unk|>``, then one token
per printable ASCII character (space to ``~``), then whole atom tokens (``[C]``, ``[c]``, ``[nH]``,
``[C@@H]``, ``[NH3+]``...), sorted. Every bracket atom of the vocabulary is one token; an unseen one
(``[Xe]``) falls back to one token per character, so any ASCII text round-trips exactly.
Coordinates cost one token per character (digits, ``-``, ``.``, ``,``, ``<``, ``>``), which is what
the constrained decoder of :mod:`molgen_grpo.constrain` walks through.

Measured cost (the shipped tokenizer; 200 QM9 SMILES drawn with ``random.Random(0).sample`` from
``qm9_smiles.txt``, the 191 that ETKDGv3 with seed 0 embeds, precision 4): a training unit
``[SMILES]…[/SMILES][CONFORMER]…[/CONFORMER]`` costs 239.8 tokens on average (median 244, range
188-259) for 8.8 heavy atoms; the prompt ``[SMILES]…[/SMILES]`` is 16.6 of them, and the completion
costs 25.2 tokens per heavy atom (each value ``-1.2345`` is 7 tokens), about what spec §1.3 reports
for Qwen's digit-split BPE.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Iterable, Sequence

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from elign.engine.errors import ConfigError
from elign.engine.paths import resolve_package_path

__all__ = ["ASSET_PATH", "COMMON_ATOMS", "EOS_TOKEN", "TAGS", "UNK_TOKEN", "atom_tokens", "build_tokenizer",
           "load_tokenizer", "main", "stop_token_ids"]

TAGS = ("[SMILES]", "[CONFORMER]", "[/SMILES]", "[/CONFORMER]")  # 3DMolGen's order (spec §1.3)
EOS_TOKEN = "<|endoftext|>"  # Qwen's pad/eos/unit separator
UNK_TOKEN = "<|unk|>"
ASSET_PATH = "package:molgen_grpo/assets/tokenizer"
PADDING_SIDES = ("left", "right")
CHARACTERS = tuple(chr(c) for c in range(0x20, 0x7F))  # printable ASCII: every SMILES / coordinate character

# Atoms of drug-like molecules (GEOM-Drugs, ChEMBL) as encode() writes them, beyond what QM9 shows:
# the organic subset wrapped, common stereo centres, charges, aromatic heteroatoms and isotopes.
COMMON_ATOMS = (
    "[B]", "[C]", "[N]", "[O]", "[P]", "[S]", "[F]", "[Cl]", "[Br]", "[I]", "[b]", "[c]", "[n]", "[o]", "[p]", "[s]",
    "[C@H]", "[C@@H]", "[C@]", "[C@@]", "[N@]", "[N@@]", "[N@+]", "[N@@+]", "[N@H+]", "[N@@H+]", "[S@]", "[S@@]",
    "[S@+]", "[S@@+]", "[P@]", "[P@@]", "[Si@]", "[Si@@]",
    "[nH]", "[nH+]", "[n+]", "[n-]", "[o+]", "[s+]", "[NH+]", "[NH2+]", "[NH3+]", "[N+]", "[N-]", "[NH-]", "[O+]",
    "[O-]", "[OH+]", "[S+]", "[S-]", "[SH]", "[P+]", "[PH]", "[C-]", "[CH-]", "[CH2-]", "[B-]", "[BH-]", "[BH3-]",
    "[Si]", "[SiH]", "[SiH2]", "[Se]", "[se]", "[SeH]", "[Te]", "[Sn]", "[Ge]", "[As]", "[2H]", "[13C]", "[13CH3]",
    "[H]", "[CH0]", "[NH0]", "[OH0]", "[SH0]",
)
_ATOM_IN_ENRICHED = re.compile(r"(\[[^\[\]<>]+\])<")
# One piece per bracket atom (kept whole if it is in the vocabulary) or per character.
_PIECE = r"\[[^\[\]<>]+\]|."


resolve_path = resolve_package_path  # the engine's package: path resolver, under its old name here


def load_tokenizer(path: str, padding_side: str = "left", tags: Sequence[str] = TAGS) -> PreTrainedTokenizerBase:
    """A Hugging Face tokenizer with the four tags as single ordinary tokens (spec §1.3).

    Args:
        path: a local tokenizer directory (``tokenizer.json`` / ``tokenizer_config.json``), a
            ``package:`` path, or a Hub id (e.g. ``Qwen/Qwen3-0.6B-Base``; offline only if cached).
        padding_side: ``left`` (generation) or ``right``.
        tags: strings added as single ordinary tokens; the four enriched-SMILES tags by default, ``[]`` for a
            plain text policy (the masked-LM reward's writer, whose tags are ordinary characters).
    Raises:
        ConfigError: ``path`` cannot be loaded (offline with a Hub id: pass a local path), the
            tokenizer has no pad token, or a tag is not one token; ``padding_side`` is not allowed.
    """
    if padding_side not in PADDING_SIDES:
        raise ConfigError("padding_side", padding_side, PADDING_SIDES)
    local = resolve_path(str(path))
    try:
        tokenizer = AutoTokenizer.from_pretrained(local, padding_side=padding_side)
    except (OSError, ValueError) as err:  # missing files, no network, malformed repo id
        where = "the directory has no loadable tokenizer" if Path(local).is_dir() else (
            "no such local directory, and the Hub id could not be loaded (no network or not cached): "
            "pass a local tokenizer directory")
        raise ConfigError("path", path, f"a tokenizer directory or a reachable Hub id ({where}; "
                                        f"{type(err).__name__}: {str(err).splitlines()[0][:160]})") from None
    if isinstance(tags, str) or not all(isinstance(t, str) and t for t in tags):
        raise ConfigError("tags", tags, "a list of non-empty strings (e.g. [] or the four enriched-SMILES tags)")
    missing = [tag for tag in tags if tag not in tokenizer.get_vocab()]
    tokenizer.add_tokens([AddedToken(tag, special=False, normalized=False) for tag in missing])
    for tag in tags:
        ids = tokenizer.encode(tag, add_special_tokens=False)
        if len(ids) != 1:
            raise ConfigError("path", path, f"a tokenizer where {tag} is one token (it encodes to {ids})")
    if tokenizer.pad_token_id is None:
        raise ConfigError("path", path, f"a tokenizer with a pad token (e.g. {EOS_TOKEN}); this one has none")
    return tokenizer


def stop_token_ids(tokenizer: PreTrainedTokenizerBase, stop_tokens: Sequence[str]) -> list[int]:
    """Ids of the ``stop_tokens`` strings (config key ``stop_tokens``), in order.

    Raises:
        ConfigError: the list is empty, or a string is not exactly one token of ``tokenizer``.
    """
    if isinstance(stop_tokens, str) or not stop_tokens:
        raise ConfigError("stop_tokens", stop_tokens, f"a non-empty list of single-token strings, e.g. "
                                                      f"['{TAGS[3]}', '{EOS_TOKEN}']")
    ids = []
    for text in stop_tokens:
        encoded = tokenizer.encode(str(text), add_special_tokens=False)
        if len(encoded) != 1:
            raise ConfigError("stop_tokens", text, f"strings that are single tokens of the tokenizer "
                                                   f"({text!r} encodes to {len(encoded)} tokens: {encoded})")
        ids.append(encoded[0])
    return ids


def atom_tokens(smiles: Iterable[str]) -> list[str]:
    """Sorted distinct atom tokens that :func:`molgen_grpo.text.encode` writes for ``smiles``.

    Each SMILES is parsed by RDKit and encoded with an all-zero conformer, so the tokens are exactly
    the encoder's (wrapped bare atoms, canonical bracket atoms, ``[XH0]`` radicals). Unparsable
    SMILES are skipped."""
    from rdkit import Chem, rdBase

    from molgen_grpo.text import encode

    found: set[str] = set()
    with rdBase.BlockLogs():
        for line in smiles:
            mol = Chem.MolFromSmiles(line.strip()) if line.strip() else None
            if mol is None or mol.GetNumAtoms() == 0:
                continue
            mol.AddConformer(Chem.Conformer(mol.GetNumAtoms()), assignId=True)
            found.update(_ATOM_IN_ENRICHED.findall(encode(mol, precision=0).enriched))
    return sorted(found)


def build_tokenizer(atoms: Iterable[str] = COMMON_ATOMS, padding_side: str = "left",
                    model_max_length: int = 4096) -> PreTrainedTokenizerFast:
    """The offline enriched-SMILES tokenizer (id layout in the module docstring).

    A BPE model with no merges and ``ignore_merges``: a pre-tokenized piece that is in the
    vocabulary (a known atom, a character) is one token, any other piece splits into characters.

    Args:
        atoms: bracket atom tokens to keep whole (e.g. ``COMMON_ATOMS`` + :func:`atom_tokens` of a corpus).
        padding_side: ``left`` (generation) or ``right``.
        model_max_length: the longest sequence the tokenizer reports as supported.
    """
    if padding_side not in PADDING_SIDES:
        raise ConfigError("padding_side", padding_side, PADDING_SIDES)
    atoms = sorted(set(atoms) - set(CHARACTERS))
    bad = [a for a in atoms if not re.fullmatch(r"\[[!-~]+\]", a) or a in TAGS or "<" in a or ">" in a]
    if bad:
        raise ConfigError("atoms", bad[:5], "bracketed printable-ASCII atom tokens such as [C@@H] (not a tag)")
    specials = [EOS_TOKEN, *TAGS, UNK_TOKEN]
    vocab = {token: index for index, token in enumerate([*specials, *CHARACTERS, *atoms])}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK_TOKEN, ignore_merges=True))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(_PIECE), behavior="isolated")
    core.decoder = decoders.Fuse()
    # Tags are ordinary tokens (kept by skip_special_tokens), as 3DMolGen adds them; eos/unk are special.
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (EOS_TOKEN, UNK_TOKEN)])
    core.add_tokens([AddedToken(tag, special=False, normalized=False) for tag in TAGS])
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN,
                                   unk_token=UNK_TOKEN, padding_side=padding_side, model_max_length=model_max_length,
                                   clean_up_tokenization_spaces=False)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m molgen_grpo.tokenizer --out DIR [--smiles FILE]``: build and save a tokenizer."""
    parser = argparse.ArgumentParser(description="Build the offline enriched-SMILES tokenizer.")
    parser.add_argument("--out", required=True, help="directory to write (save_pretrained)")
    parser.add_argument("--smiles", action="append", default=[],
                        help="text file with one SMILES per line whose atom tokens join the vocabulary (repeatable)")
    args = parser.parse_args(argv)
    atoms = set(COMMON_ATOMS)
    for path in args.smiles:
        with open(path, encoding="utf-8") as handle:
            atoms.update(atom_tokens(handle))
    tokenizer = build_tokenizer(atoms)
    tokenizer.save_pretrained(args.out)
    summary = {"out": args.out, "vocab_size": len(tokenizer), "atoms": len(atoms),
               "tags": {tag: tokenizer.convert_tokens_to_ids(tag) for tag in TAGS}}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
