"""Packed pretraining rows from enriched-SMILES JSONL (spec §1.4, 3DMolGen's ``JsonlTaggedPackedDataset``).

Pipeline, one unit per JSONL line ``{"canonical_smiles": ..., "embedded_smiles": ...}``:

    stream lines -> skip short -> "[SMILES]c[/SMILES][CONFORMER]e[/CONFORMER]" -> tokens (no special
    tokens) -> truncate to seq_len - 1 -> shuffle buffer -> look-ahead window -> best-fit packing

Row layout (``L = seq_len``, ``sep`` = the tokenizer's pad token, ``<|endoftext|>`` for Qwen)::

    input_ids       u1 ... sep u2 ... sep pad pad      (every unit is followed by one sep)
    labels          input_ids shifted left by one; -100 at the row's last sep and on the padding
    attention_mask  1 up to and including the last sep, 0 on the tail padding

- Labels: ``labels[i] = input_ids[i + 1]`` wherever position ``i + 1`` holds a real token (a unit
  token or a separator). So the separator after a unit *is* a target: the model learns to write
  ``<|endoftext|>`` after ``[/CONFORMER]``, which is how 3DMolGen's rollouts stop (spec §1.3). The
  token after an inner separator (always ``[SMILES]``) is a target too, as in 3DMolGen. The last
  separator of a row (its next token is padding or the row's end) and the padding are -100.
- Attention: plain causal attention over the whole row, as in 3DMolGen (TorchTitan, no document
  masking): a unit attends to the units packed before it, across separators, and position ids run on
  across units (``Qwen3Policy.supervised_loss`` derives them from ``attention_mask``: 0..used-1).
  Because the padding is at the tail, a causal model gives real tokens the same outputs with or
  without the mask; it keeps ``num_tokens`` honest. No per-unit positions or document mask are
  offered: the policy's ``supervised_loss`` takes neither, and 3DMolGen trains without them.
- A unit is never split across rows. A unit longer than ``seq_len - 1`` tokens is cut to
  ``seq_len - 1`` (counted in ``truncated``) so that it and its separator fill one row.
- Shuffling: a streaming buffer of ``shuffle_buffer`` tokenized units; each draw takes a uniformly
  random one (``random.Random`` seeded with ``(seed, epoch)``) and the stream refills it. A buffer of
  1 keeps file order. (3DMolGen permutes a line index of the whole file instead; we only stream.)
- Packing: a window of up to ``lookahead`` pending units; the next unit placed is the one that leaves
  the least room in the row (the first one on ties); when none fits, the row is emitted. At the end
  of an epoch the last partial row is emitted, then the next epoch reshuffles (``infinite``).
- Sharding: by packed row. Every rank builds the same global row stream and rank ``r`` of ``w``
  keeps rows ``r, r + w, r + 2w, ...``. Why rows and not lines: the engine saves one data state
  (rank 0's) and loads it on every rank, so the state must not depend on the rank; and the global
  row stream is then the same whatever the world size. The price is that every rank reads and
  tokenizes all units: each step, every rank tokenizes the global batch (the shipped tokenizer does
  about 0.76 M tokens/s on one CPU thread, so 24 ranks x 2 rows x 4096 tokens cost ~0.26 s per step).
  Each :meth:`next_row` builds a whole group of ``w`` rows, so every rank's state is the same
  between rows. With ``infinite=False`` an epoch's last incomplete group is dropped (all ranks
  yield as many rows).
- Resume: :meth:`state_dict` holds the file position, the epoch, the RNG state, the buffer and the
  window (ints and lists of ints: loads with ``torch.load(weights_only=True)``); after
  :meth:`load_state_dict` the next rows are exactly those of an uninterrupted run.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import IO, Any, Iterator, Sequence

import torch
from torch import Tensor
from torch.utils.data import IterableDataset, get_worker_info
from transformers import PreTrainedTokenizerBase

from elign.engine.errors import ConfigError, DataFormatError, check_int
from molgen_grpo.tokenizer import load_tokenizer, resolve_path

__all__ = ["IGNORE_INDEX", "MIN_EMBEDDED_CHARS", "PackedBatches", "PackedJsonl", "best_fit", "build_unit",
           "pack_row"]

IGNORE_INDEX = -100  # label of positions with no real next token (cross_entropy's ignore_index)
MIN_EMBEDDED_CHARS = 16  # 3DMolGen's min_emb_len: shorter embedded strings are skipped
SHIPPED_DATA = "package:molgen_grpo/data/qm9_conformers"  # built by scripts/build_molgen_data.py
KEYS = ("canonical_smiles", "embedded_smiles")
COUNTERS = ("units", "skipped", "truncated", "rows")
STATE_KEYS = ("epoch", "file_index", "byte_offset", "line_number", "rng", "buffer", "pending")


def build_unit(canonical: str, embedded: str) -> str:
    """The pretraining unit of spec §1.2: ``[SMILES]{canonical}[/SMILES][CONFORMER]{embedded}[/CONFORMER]``."""
    return f"[SMILES]{canonical}[/SMILES][CONFORMER]{embedded}[/CONFORMER]"


def pack_row(units: Sequence[Sequence[int]], seq_len: int, sep_id: int) -> dict[str, Tensor]:
    """One packed row: each unit followed by ``sep_id``, then ``sep_id`` padding up to ``seq_len``.

    Returns:
        ``input_ids [L]``, ``labels [L]`` (shifted left by one; -100 at the last separator and on the
        padding) and ``attention_mask [L]`` (1 on units and separators, 0 on the padding), all long.

    Raises:
        ValueError: the units and their separators need more than ``seq_len`` positions.
    """
    ids = [token for unit in units for token in (*unit, sep_id)]
    used = len(ids)
    if used > seq_len:
        raise ValueError(f"{len(units)} units need {used} positions with their separators, more than seq_len={seq_len}")
    input_ids = torch.full((seq_len,), sep_id, dtype=torch.long)
    input_ids[:used] = torch.tensor(ids, dtype=torch.long)
    labels = torch.full((seq_len,), IGNORE_INDEX, dtype=torch.long)
    labels[:used - 1] = input_ids[1:used]  # the last separator's next position is padding or the end
    mask = torch.zeros(seq_len, dtype=torch.long)
    mask[:used] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}


def best_fit(lengths: Sequence[int], space: int) -> int | None:
    """Index of the unit (token count ``lengths[i]``, plus one separator) that leaves the least room
    out of ``space`` positions; the first such on ties; None when none fits."""
    best, best_left = None, None
    for index, length in enumerate(lengths):
        left = space - (length + 1)
        if left >= 0 and (best_left is None or left < best_left):
            best, best_left = index, left
            if left == 0:
                break
    return best


class PackedJsonl(IterableDataset):
    """Packed rows ``{input_ids [L], labels [L], attention_mask [L]}`` from JSONL files, forever
    (``infinite``) or for one epoch. Iterate it in the process that saves its state (no DataLoader
    workers: the resume state lives in this object)."""

    def __init__(
        self,
        paths: str | Sequence[str],
        tokenizer: PreTrainedTokenizerBase | str,
        seq_len: int = 2048,
        seed: int = 0,
        shuffle_buffer: int = 4096,
        lookahead: int = 100,
        min_embedded_chars: int = MIN_EMBEDDED_CHARS,
        infinite: bool = True,
    ) -> None:
        """
        Args:
            paths: one JSONL file or a list of them, read in order; ``package:<package>/<path>`` allowed.
            tokenizer: a tokenizer, or a path for :func:`molgen_grpo.tokenizer.load_tokenizer`; its pad
                token is the separator and the padding.
            seq_len: tokens per row (3DMolGen: 2048 by default, 4096 in the current run).
            seed: seed of the shuffle (per epoch).
            shuffle_buffer: units held for shuffling (1 = file order).
            lookahead: pending units the packer chooses among (1 = next fit).
            min_embedded_chars: lines whose embedded string is shorter are skipped.
            infinite: start a new epoch after the last line (False: stop after one).
        """
        paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
        if not paths:
            raise ConfigError("paths", paths, "one JSONL file or a non-empty list of them")
        resolved = [resolve_path(str(p)) for p in paths]  # package:<package>/<path> or a plain path
        for raw, path in zip(paths, resolved):
            if not Path(path).is_file():
                hint = " (build it with scripts/build_molgen_data.py)" if str(raw).startswith(SHIPPED_DATA) else ""
                raise FileNotFoundError(f"JSONL file not found: {raw} -> {path}{hint}")
        self.paths = resolved
        self.tokenizer = load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
        if self.tokenizer.pad_token_id is None:
            raise ConfigError("tokenizer", type(self.tokenizer).__name__,
                              "a tokenizer with a pad token (the separator)")
        self.sep_id = int(self.tokenizer.pad_token_id)
        self.seq_len = check_int("seq_len", seq_len, 2)
        self.seed = check_int("seed", seed)
        self.shuffle_buffer = check_int("shuffle_buffer", shuffle_buffer, 1)
        self.lookahead = check_int("lookahead", lookahead, 1)
        self.min_embedded_chars = check_int("min_embedded_chars", min_embedded_chars, 0)
        if not isinstance(infinite, bool):
            raise ConfigError("infinite", infinite, "true or false")
        self.infinite = infinite
        self.rank, self.world_size = 0, 1
        self._handle: IO[bytes] | None = None
        self._handle_index = -1
        self._reset_epoch(0)
        self.counts = dict.fromkeys(COUNTERS, 0)

    # ------------------------------------------------------------------ public

    def shard(self, rank: int, world_size: int) -> None:
        """Keep global rows ``rank, rank + world_size, ...`` (see the module docstring)."""
        self.world_size = check_int("world_size", world_size, 1)
        self.rank = check_int("rank", rank, 0, self.world_size - 1)

    def next_row(self) -> dict[str, Tensor]:
        """This rank's next row; raises StopIteration after the last full group of a finite epoch."""
        group = [self._next_global_row() for _ in range(self.world_size)]
        return group[self.rank]

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        if get_worker_info() is not None:
            raise RuntimeError("PackedJsonl must be iterated in the main process (DataLoader num_workers=0): "
                               "its resume state lives in this object")
        while True:
            try:
                yield self.next_row()
            except StopIteration:
                return

    def metrics(self) -> dict[str, float]:
        """Counters since the start of the run (over all ranks' rows): units packed, lines skipped
        (short embedded string or empty SMILES), units truncated, rows built, and the epoch."""
        return {**{f"data/{k}": float(v) for k, v in self.counts.items()}, "data/epoch": float(self.epoch)}

    def state_dict(self) -> dict[str, Any]:
        """Ints and lists of ints. The trainer asks for it every iteration, so the unit lists are
        shared, not copied: a tokenized unit is never modified, only moved between lists."""
        return {
            "epoch": self.epoch, "file_index": self.file_index, "byte_offset": self.byte_offset,
            "line_number": self.line_number, "rng": list(self._rng.getstate()[1]),
            "buffer": list(self._buffer), "pending": list(self._pending), **self.counts,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = [k for k in (*STATE_KEYS, *COUNTERS) if k not in state]
        if missing:
            raise KeyError(f"PackedJsonl state lacks {missing} (not a state_dict() of this class)")
        self._reset_epoch(int(state["epoch"]))
        self.file_index, self.byte_offset = int(state["file_index"]), int(state["byte_offset"])
        self.line_number = int(state["line_number"])
        self._rng.setstate((3, tuple(int(v) for v in state["rng"]), None))  # version 3: Python 3's Random
        self._buffer = [[int(t) for t in unit] for unit in state["buffer"]]
        self._pending = [[int(t) for t in unit] for unit in state["pending"]]
        self.counts = {k: int(state[k]) for k in COUNTERS}

    def close(self) -> None:
        """Close the open JSONL file (reading reopens it at the saved offset)."""
        if getattr(self, "_handle", None) is not None:
            self._handle.close()
        self._handle, self._handle_index = None, -1

    def __del__(self) -> None:
        self.close()

    # ------------------------------------------------------------------ packing

    def _next_global_row(self) -> dict[str, Tensor]:
        started_epoch = self.epoch
        while True:
            row: list[list[int]] = []
            space = self.seq_len
            while True:
                self._fill_window()
                index = best_fit([len(unit) for unit in self._pending], space)
                if index is None:  # nothing fits, or the epoch is used up
                    break
                unit = self._pending.pop(index)
                row.append(unit)
                space -= len(unit) + 1
            if row:
                self.counts["rows"] += 1
                self.counts["units"] += len(row)
                return pack_row(row, self.seq_len, self.sep_id)
            if not self.infinite:
                raise StopIteration
            if self.epoch > started_epoch:  # a whole epoch gave no unit: it never will
                raise ValueError(f"no usable unit in {self.paths} (every line was skipped: embedded string "
                                 f"shorter than min_embedded_chars={self.min_embedded_chars} or empty SMILES)")
            self._reset_epoch(self.epoch + 1)

    def _fill_window(self) -> None:
        while len(self._pending) < self.lookahead:
            unit = self._draw()
            if unit is None:
                return
            self._pending.append(unit)

    def _draw(self) -> list[int] | None:
        """A uniformly random unit of the shuffle buffer, after topping it up from the stream."""
        while len(self._buffer) < self.shuffle_buffer:
            unit = self._read_unit()
            if unit is None:
                break
            self._buffer.append(unit)
        if not self._buffer:
            return None
        j = self._rng.randrange(len(self._buffer))
        self._buffer[j], self._buffer[-1] = self._buffer[-1], self._buffer[j]
        return self._buffer.pop()

    def _reset_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.file_index, self.byte_offset, self.line_number = 0, 0, 0
        self._rng = random.Random(f"{self.seed}:{epoch}")  # a str seed hashes the same in every process
        self._buffer: list[list[int]] = []
        self._pending: list[list[int]] = []
        self.close()

    # ------------------------------------------------------------------ reading

    def _read_unit(self) -> list[int] | None:
        """The next usable unit's tokens from the stream; None at the end of the last file."""
        while self.file_index < len(self.paths):
            handle = self._open()
            raw = handle.readline()
            if not raw:
                self.file_index, self.byte_offset, self.line_number = self.file_index + 1, 0, 0
                self.close()
                continue
            self.byte_offset += len(raw)
            self.line_number += 1
            tokens = self._parse(raw, self.paths[self.file_index], self.line_number)
            if tokens is not None:
                return tokens
        return None

    def _open(self) -> IO[bytes]:
        if self._handle is None or self._handle_index != self.file_index:
            self.close()
            self._handle = open(self.paths[self.file_index], "rb")  # bytes: exact offsets for resuming
            self._handle.seek(self.byte_offset)
            self._handle_index = self.file_index
        return self._handle

    def _parse(self, raw: bytes, path: str, line: int) -> list[int] | None:
        try:
            text = raw.decode("utf-8").strip()
        except UnicodeDecodeError as err:
            raise DataFormatError(path, line, f"not UTF-8 ({err})") from None
        if not text:
            return None  # blank line (e.g. a trailing newline)
        try:
            record = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataFormatError(path, line, f"bad JSON ({err})") from None
        if not isinstance(record, dict):
            raise DataFormatError(path, line, f"expected an object with keys {list(KEYS)}, got {type(record).__name__}")
        for key in KEYS:
            if not isinstance(record.get(key), str):
                what = "missing key" if key not in record else "non-string value for key"
                raise DataFormatError(path, line, f"{what} {key!r}")
        canonical, embedded = record[KEYS[0]].strip(), record[KEYS[1]].strip()
        if not canonical or len(embedded) < self.min_embedded_chars:
            self.counts["skipped"] += 1
            return None
        tokens = self.tokenizer.encode(build_unit(canonical, embedded), add_special_tokens=False)
        if len(tokens) > self.seq_len - 1:
            self.counts["truncated"] += 1
            tokens = tokens[:self.seq_len - 1]
        return list(tokens)


class PackedBatches:
    """``batch_size`` packed rows per call, stacked: ``input_ids``, ``labels``, ``attention_mask``
    ``[B, L]`` (the engine's data source for the supervised strategy, like ``MoleculeBatches``)."""

    group_size = 1  # supervised data has no groups

    def __init__(self, dataset: PackedJsonl, batch_size: int) -> None:
        """
        Args:
            dataset: the packed row stream.
            batch_size: rows per batch and rank (3DMolGen's local batch size).
        """
        self.dataset = dataset
        self.batch_size = check_int("batch_size", batch_size, 1)

    def shard(self, rank: int, world_size: int) -> None:
        """Under torchrun: this rank keeps every ``world_size``-th row (see :class:`PackedJsonl`)."""
        self.dataset.shard(rank, world_size)

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        return self

    def __next__(self) -> dict[str, Tensor]:
        rows = [self.dataset.next_row() for _ in range(self.batch_size)]
        return {key: torch.stack([row[key] for row in rows]) for key in rows[0]}

    def metrics(self) -> dict[str, float]:
        return self.dataset.metrics()

    def state_dict(self) -> dict[str, Any]:
        return self.dataset.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.dataset.load_state_dict(state)
