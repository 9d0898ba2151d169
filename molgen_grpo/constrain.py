"""Constrained decoding: completions that copy the prompt's topology and only sample coordinates.

For a prompt ``[SMILES]S[/SMILES]`` the completion must read
``[CONFORMER]`` + the enriched SMILES of S (spec §1.2) + ``[/CONFORMER]`` (+ a stop token), where every
atom token, bond, ring digit, branch and ``.`` is forced and the model samples only the numbers of
each ``<x,y,z>`` block, under the grammar ``-?(0|[1-9][0-9]{0,m-1})\\.[0-9]{p}`` (``m`` =
``max_integer_digits``, ``p`` = ``precision``). So every constrained completion decodes with
:func:`molgen_grpo.text.decode` into a molecule of the prompt's graph (the topology is what
:func:`~molgen_grpo.text.encode` writes for RDKit's parse of S; ``-0.0000`` is allowed, the decoder reads it).

The grammar is walked over single-character tokens (digits, ``-``, ``.``, ``,``, ``<``, ``>``), which
both our tokenizer and Qwen3's have; fixed text between coordinate blocks is tokenized one segment
at a time. Each row of a batch has its own template and cursor, so a batch mixes molecules, and the
prompt's left padding does not matter (only generated tokens advance a cursor).
"""

from __future__ import annotations

import re
from typing import Sequence

import torch
from rdkit import Chem, rdBase
from torch import Tensor
from transformers import LogitsProcessor, PreTrainedTokenizerBase

from molgen_grpo.text import encode

__all__ = ["NUMBER", "ConformerLogitsProcessor", "CoordinateAlphabet", "conformer_template", "prompt_smiles"]

NUMBER = -1  # template element: one sampled number (any other element is a forced token id)
_PROMPT = re.compile(r"\[SMILES\](?P<smiles>.+)\[/SMILES\]")
_BLOCK = re.compile(r"<[^<>]*>")


def prompt_smiles(text: str) -> str:
    """The SMILES inside ``[SMILES]…[/SMILES]``; ValueError if ``text`` is not such a prompt."""
    match = _PROMPT.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"constrained decoding needs prompts of the form [SMILES]<smiles>[/SMILES], got {text!r}")
    return match["smiles"]


class CoordinateAlphabet:
    """Ids of the single-character tokens the coordinate grammar uses."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        ids = {}
        for char in "0123456789-.,<>":
            encoded = tokenizer.encode(char, add_special_tokens=False)
            if len(encoded) != 1:
                raise ValueError(f"constrained decoding needs {char!r} to be one token; the tokenizer gives {encoded}")
            ids[char] = encoded[0]
        self.digits = [ids[c] for c in "0123456789"]
        self.minus, self.dot, self.comma, self.open, self.close = (ids[c] for c in "-.,<>")

    @property
    def ids(self) -> set[int]:
        return {*self.digits, self.minus, self.dot, self.comma, self.open, self.close}


def conformer_template(smiles: str, tokenizer: PreTrainedTokenizerBase, alphabet: CoordinateAlphabet,
                       end: Sequence[int]) -> list[int]:
    """The completion for ``smiles`` as forced token ids and :data:`NUMBER` slots.

    ``[CONFORMER]``, then for each atom its token(s) and ``< NUMBER , NUMBER , NUMBER >``, with the
    bonds, rings and branches between them, then ``end`` (``[/CONFORMER]`` and, if it is not itself a
    stop token, a stop token)."""
    with rdBase.BlockLogs():
        mol = Chem.MolFromSmiles(smiles)
    if mol is None or mol.GetNumAtoms() == 0:
        raise ValueError(f"constrained decoding: RDKit cannot parse the prompt SMILES {smiles!r}")
    mol.AddConformer(Chem.Conformer(mol.GetNumAtoms()), assignId=True)
    segments = _BLOCK.split(encode(mol, precision=1).enriched)  # text between coordinate blocks
    block = [alphabet.open, NUMBER, alphabet.comma, NUMBER, alphabet.comma, NUMBER, alphabet.close]
    template = tokenizer.encode("[CONFORMER]", add_special_tokens=False)
    for i, segment in enumerate(segments):
        template += tokenizer.encode(segment, add_special_tokens=False) if segment else []
        if i < len(segments) - 1:
            template += block
    return template + list(end)


class _Cursor:
    """Where one row is in its template; inside a NUMBER: sign, integer digits, decimals."""

    def __init__(self, template: list[int]) -> None:
        self.template, self.index = template, 0
        self.sign = False
        self.integer: list[int] = []  # integer digits so far (ids)
        self.decimals: int | None = None  # None before the '.'

    @property
    def done(self) -> bool:
        return self.index >= len(self.template)

    def allowed(self, a: CoordinateAlphabet, precision: int, max_integer_digits: int) -> list[int]:
        element = self.template[self.index]
        if element != NUMBER:
            return [element]
        if self.decimals is not None:
            return a.digits
        if not self.integer:
            return a.digits if self.sign else [*a.digits, a.minus]
        room = len(self.integer) < max_integer_digits and self.integer[0] != a.digits[0]  # no leading zero
        return [*a.digits, a.dot] if room else [a.dot]

    def advance(self, token: int, a: CoordinateAlphabet, precision: int) -> None:
        if self.template[self.index] != NUMBER:
            self.index += 1
        elif token == a.minus:
            self.sign = True
        elif token == a.dot:
            self.decimals = 0
        elif self.decimals is None:
            self.integer.append(token)
        else:
            self.decimals += 1
            if self.decimals == precision:
                self.index += 1
                self.sign, self.integer, self.decimals = False, [], None


class ConformerLogitsProcessor(LogitsProcessor):
    """Masks every token the row's template does not allow next (one template per batch row).

    Stateful: one instance serves one ``generate`` call. ``forced`` lists, per generated position,
    which rows had exactly one allowed token (``[B]`` bool each); the policy keeps those out of the
    trained steps, since their probability under the constrained sampler is 1 whatever the weights.

    Args:
        templates: per batch row, from :func:`conformer_template`.
        alphabet: the coordinate characters' ids.
        precision: decimals per number (>= 1).
        max_integer_digits: cap on the integer digits of a number (>= 1).
        pad_id: the only token allowed to a row whose template is complete (generation pads it).
    """

    def __init__(self, templates: list[list[int]], alphabet: CoordinateAlphabet, precision: int,
                 max_integer_digits: int, pad_id: int) -> None:
        if precision < 1 or max_integer_digits < 1:
            raise ValueError(f"precision and max_integer_digits must be >= 1, got {precision}, {max_integer_digits}")
        self.cursors = [_Cursor(t) for t in templates]
        self.alphabet, self.precision, self.max_integer_digits = alphabet, precision, max_integer_digits
        self.pad_id = pad_id
        self.prompt_length: int | None = None
        self.forced: list[Tensor] = []

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if len(self.cursors) != input_ids.shape[0]:
            raise ValueError(f"{len(self.cursors)} templates for a batch of {input_ids.shape[0]} rows")
        if self.prompt_length is None:
            self.prompt_length = input_ids.shape[1]
        elif input_ids.shape[1] != self.prompt_length + len(self.forced):
            raise RuntimeError("ConformerLogitsProcessor must see every generated token once "
                               "(one instance per generate call)")
        else:
            for row, (cursor, token) in enumerate(zip(self.cursors, input_ids[:, -1].tolist())):
                if not cursor.done:
                    if token not in self._allowed(cursor):
                        raise RuntimeError(f"row {row} generated token {token}, which its template did not allow")
                    cursor.advance(token, self.alphabet, self.precision)
        keep = torch.zeros_like(scores, dtype=torch.bool)
        forced = torch.zeros(len(self.cursors), dtype=torch.bool)
        for row, cursor in enumerate(self.cursors):
            allowed = self._allowed(cursor)
            keep[row, allowed] = True
            forced[row] = len(allowed) == 1
        self.forced.append(forced)
        return scores.masked_fill(~keep, float("-inf"))

    def _allowed(self, cursor: _Cursor) -> list[int]:
        if cursor.done:
            return [self.pad_id]
        return cursor.allowed(self.alphabet, self.precision, self.max_integer_digits)
