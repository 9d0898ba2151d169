"""Packed JSONL rows (spec §1.4): hand-packed rows and labels, best fit, truncation, skips and
errors, no split, sharding, exact resume, seeded shuffling, batches for the supervised loss."""

from __future__ import annotations

import io
import json
import random
import re
from collections import Counter

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from elign.engine.errors import DataFormatError  # noqa: E402
from molgen_grpo.packing import PackedBatches, PackedJsonl, best_fit, build_unit, pack_row  # noqa: E402
from molgen_grpo.tokenizer import ASSET_PATH, load_tokenizer  # noqa: E402

M = -100
TOKENIZER = load_tokenizer(ASSET_PATH)


@pytest.fixture(scope="module")
def tok():
    return TOKENIZER


def record(uid: int, n: int) -> dict:
    """A JSONL record whose unit costs exactly ``n`` tokens with the shipped tokenizer
    ([SMILES] C [/SMILES] [CONFORMER] [C] < digits > [/CONFORMER]) and whose digits spell ``uid``."""
    return {"canonical_smiles": "C", "embedded_smiles": f"[C]<{uid:0{n - 8}d}>"}


def unit_tokens(tok, uid: int, n: int) -> list[int]:
    return tok.encode(build_unit("C", record(uid, n)["embedded_smiles"]), add_special_tokens=False)


def write(tmp_path, lines, name="data.jsonl") -> str:
    path = tmp_path / name
    path.write_text("".join((json.dumps(x) if isinstance(x, dict) else x) + "\n" for x in lines))
    return str(path)


def make(path, tok, **kw) -> PackedJsonl:
    kw = {"seq_len": 64, "shuffle_buffer": 1, "lookahead": 1, "infinite": False, **kw}
    return PackedJsonl(path, tok, **kw)


def uids(row, sep) -> list[int]:
    """Unit ids of a row, in order, from the digits of each unit between separators."""
    ids = row["input_ids"][:int(row["attention_mask"].sum())].tolist()
    assert ids[-1] == sep
    out, unit = [], []
    for t in ids:
        if t == sep:
            out.append(unit)
            unit = []
        else:
            unit.append(t)
    return [int(re.search(r"<(\d+)>", TOKENIZER.decode(u)).group(1)) for u in out]


def take(ds, n):
    return [ds.next_row() for _ in range(n)]


def same_rows(a, b):
    return len(a) == len(b) and all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x)


# ---------------------------------------------------------------------- pure functions

def test_pack_row_by_hand():
    row = pack_row([[11, 12, 13], [21, 22]], seq_len=8, sep_id=0)
    assert row["input_ids"].tolist() == [11, 12, 13, 0, 21, 22, 0, 0]
    # the separator after a unit is a target (12 -> 13 -> 0), the one closing the row is not
    assert row["labels"].tolist() == [12, 13, 0, 21, 22, 0, M, M]
    assert row["attention_mask"].tolist() == [1, 1, 1, 1, 1, 1, 1, 0]
    full = pack_row([[1, 2, 3]], seq_len=4, sep_id=9)
    assert full["input_ids"].tolist() == [1, 2, 3, 9]
    assert full["labels"].tolist() == [2, 3, 9, M]
    assert full["attention_mask"].tolist() == [1, 1, 1, 1]
    with pytest.raises(ValueError, match="seq_len=4"):
        pack_row([[1, 2], [3]], seq_len=4, sep_id=0)


def test_best_fit_by_hand():
    # costs (length + 1) 6, 4, 7, 3 into 7 leave 1, 3, 0, 4: the exact fit wins
    assert best_fit([5, 3, 6, 2], 7) == 2
    assert best_fit([3, 2, 3], 5) == 0  # leaves 1, 2, 1: the first of the tie
    assert best_fit([7, 9], 7) is None
    assert best_fit([], 7) is None


def test_unit_lengths_are_what_the_helper_says(tok):
    for n in (19, 25, 40):
        assert len(unit_tokens(tok, 7, n)) == n


# ---------------------------------------------------------------------- packing through the dataset

LENGTHS = [20, 25, 30, 19, 40]  # units 0..4, costs 21, 26, 31, 20, 41 with their separators


def test_next_fit_rows_and_labels_by_hand(tmp_path, tok):
    ds = make(write(tmp_path, [record(i, n) for i, n in enumerate(LENGTHS)]), tok)
    rows = list(ds)
    # 21 + 26 = 47 <= 64, + 31 > 64 -> emit; 31 + 20 = 51, + 41 > 64 -> emit; then unit 4 alone
    assert [uids(r, ds.sep_id) for r in rows] == [[0, 1], [2, 3], [4]]
    t0, t1 = unit_tokens(tok, 0, LENGTHS[0]), unit_tokens(tok, 1, LENGTHS[1])
    sep, used = ds.sep_id, 47
    expected = t0 + [sep] + t1 + [sep] + [sep] * (64 - used)
    row = rows[0]
    assert row["input_ids"].tolist() == expected
    assert row["labels"].tolist() == expected[1:used] + [M] * (64 - used + 1)
    assert row["attention_mask"].tolist() == [1] * used + [0] * (64 - used)
    # after [/CONFORMER] the target is the separator; after the inner separator it is [SMILES]
    end = tok.convert_tokens_to_ids("[/CONFORMER]")
    assert row["input_ids"][19].item() == end and row["labels"][19].item() == sep
    assert row["labels"][20].item() == tok.convert_tokens_to_ids("[SMILES]")
    assert ds.metrics()["data/rows"] == 3 and ds.metrics()["data/units"] == 5


def test_lookahead_picks_the_best_fit(tmp_path, tok):
    ds = make(write(tmp_path, [record(i, n) for i, n in enumerate(LENGTHS)]), tok, lookahead=3)
    # window {0,1,2} into 64 leaves 43, 38, 33 -> 2; window {0,1,3} into 33 leaves 12, 7, 13 -> 1;
    # window {0,3,4}: nothing fits 7 -> emit. Then {0,3,4} into 64 leaves 43, 44, 23 -> 4;
    # {0,3} into 23 leaves 2, 3 -> 0; {3} does not fit 2 -> emit; last row: 3.
    assert [uids(r, ds.sep_id) for r in ds] == [[2, 1], [4, 0], [3]]


def test_long_unit_is_truncated_never_split(tmp_path, tok):
    ds = make(write(tmp_path, [record(0, 19), record(1, 40), record(2, 19)]), tok, seq_len=32)
    rows = list(ds)
    assert len(rows) == 3 and ds.metrics()["data/truncated"] == 1
    long = rows[1]
    full = unit_tokens(tok, 1, 40)
    assert long["input_ids"].tolist() == full[:31] + [ds.sep_id]
    assert long["labels"].tolist() == full[1:31] + [ds.sep_id, M]
    assert long["attention_mask"].tolist() == [1] * 32


def test_skips_short_and_blank_lines_and_names_file_and_line(tmp_path, tok):
    short = {"canonical_smiles": "C", "embedded_smiles": "[C]<0,0,0>"}  # 10 characters < 16
    empty = {"canonical_smiles": "", "embedded_smiles": record(9, 30)["embedded_smiles"]}
    ds = make(write(tmp_path, [record(0, 20), short, "", empty, record(1, 20)]), tok)
    assert [uids(r, ds.sep_id) for r in ds] == [[0, 1]]
    assert ds.metrics()["data/skipped"] == 2
    bad = write(tmp_path, [record(0, 20), record(1, 20), "{not json"], name="bad.jsonl")
    with pytest.raises(DataFormatError, match=r"bad\.jsonl:3: bad JSON"):
        list(make(bad, tok))
    only_short = write(tmp_path, [short, short], name="short.jsonl")
    with pytest.raises(ValueError, match="no usable unit"):  # instead of looping over empty epochs
        make(only_short, tok, infinite=True).next_row()
    missing = write(tmp_path, [{"canonical_smiles": "C"}], name="missing.jsonl")
    with pytest.raises(DataFormatError, match=r"missing\.jsonl:1: missing key 'embedded_smiles'"):
        list(make(missing, tok))


def corpus(tmp_path, n=60, seed=0):
    """``n`` units of random lengths 19-60; returns the path and each unit's length."""
    rng = random.Random(seed)
    lengths = [rng.randint(19, 60) for _ in range(n)]
    return write(tmp_path, [record(i, k) for i, k in enumerate(lengths)]), lengths


def test_epoch_holds_every_unit_once_and_whole(tmp_path, tok):
    path, lengths = corpus(tmp_path)
    ds = make(path, tok, seq_len=128, shuffle_buffer=8, lookahead=5)
    rows = list(ds)
    seen = [u for r in rows for u in uids(r, ds.sep_id)]
    assert Counter(seen) == Counter(range(len(lengths)))
    for row in rows:  # the row is its units, each complete and followed by one separator
        used = int(row["attention_mask"].sum())
        want = [t for uid in uids(row, ds.sep_id) for t in unit_tokens(tok, uid, lengths[uid]) + [ds.sep_id]]
        assert row["input_ids"][:used].tolist() == want
    assert ds.metrics()["data/truncated"] == 0


def test_rows_are_sharded_disjoint_and_covering(tmp_path, tok):
    path, _ = corpus(tmp_path, n=80)
    kw = dict(seq_len=128, shuffle_buffer=8, lookahead=5)
    every = list(make(path, tok, **kw))
    assert len(every) >= 9
    world = 3
    shards = []
    for rank in range(world):
        ds = make(path, tok, **kw)
        ds.shard(rank, world)
        shards.append(list(ds))
    groups = len(every) // world  # the incomplete last group of a finite epoch is dropped
    for rank, rows in enumerate(shards):
        assert same_rows(rows, every[rank::world][:groups])
    got = sorted(u for rows in shards for r in rows for u in uids(r, tok.pad_token_id))
    want = sorted(u for r in every[:groups * world] for u in uids(r, tok.pad_token_id))
    assert got == want and len(set(got)) == len(got)


def test_resume_gives_exactly_the_following_rows(tmp_path, tok):
    path, _ = corpus(tmp_path, n=12)  # small: the run crosses several epochs
    kw = dict(seq_len=96, shuffle_buffer=4, lookahead=3, infinite=True, seed=5)
    straight = take(make(path, tok, **kw), 14)
    for k in (0, 1, 4, 9):
        first = make(path, tok, **kw)
        take(first, k)
        state = first.state_dict()
        take(first, 3)  # the state taken before must not change as the stream goes on
        buffer = io.BytesIO()
        torch.save(state, buffer)
        buffer.seek(0)
        resumed = make(path, tok, **kw)
        resumed.load_state_dict(torch.load(buffer, weights_only=True))
        assert same_rows(take(resumed, 14 - k), straight[k:]), k
    assert resumed.epoch >= 2  # the resumed runs crossed epoch boundaries


def test_every_rank_resumes_from_rank_zeros_state(tmp_path, tok):
    path, _ = corpus(tmp_path, n=30)
    kw = dict(seq_len=96, shuffle_buffer=4, lookahead=3, infinite=True)
    rank1 = make(path, tok, **kw)
    rank1.shard(1, 2)
    straight = take(rank1, 8)
    rank0 = make(path, tok, **kw)
    rank0.shard(0, 2)
    take(rank0, 3)
    resumed = make(path, tok, **kw)
    resumed.shard(1, 2)
    resumed.load_state_dict(rank0.state_dict())  # the engine saves rank 0's state only
    assert same_rows(take(resumed, 5), straight[3:])


def test_shuffle_is_seeded_and_reshuffles_each_epoch(tmp_path, tok):
    path, lengths = corpus(tmp_path, n=40)
    n = len(lengths)
    kw = dict(seq_len=64, shuffle_buffer=16, lookahead=1, infinite=True)
    order = lambda ds, rows: [u for r in take(ds, rows) for u in uids(r, ds.sep_id)]  # noqa: E731
    a, b, c = (order(make(path, tok, seed=s, **kw), 80) for s in (1, 1, 2))
    assert a == b and a != c
    assert a[:n] != a[n:2 * n] and sorted(a[:n]) == sorted(a[n:2 * n]) == list(range(n))  # epoch 1 vs 0
    plain = order(make(path, tok, seq_len=64, shuffle_buffer=1, lookahead=1, infinite=True), 40)
    assert plain[:n] == list(range(n))  # a buffer of 1 keeps file order


def test_batches_feed_the_supervised_loss(tmp_path, tok):
    path, _ = corpus(tmp_path, n=20)
    batches = PackedBatches(make(path, tok, seq_len=96, infinite=True), batch_size=3)
    batch = next(batches)
    keys = ("input_ids", "labels", "attention_mask")
    assert {k: tuple(v.shape) for k, v in batch.items()} == {k: (3, 96) for k in keys}
    assert batches.group_size == 1 and batches.state_dict()["rows"] == 3
    loader = DataLoader(make(path, tok, seq_len=96, infinite=False), batch_size=2)  # a torch loader works too
    assert tuple(next(iter(loader))["input_ids"].shape) == (2, 96)

    from molgen_grpo.policy import Qwen3Policy
    torch.manual_seed(0)
    policy = Qwen3Policy(tok, dict(init="random", hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=1, intermediate_size=32, head_dim=16,
                                   max_position_embeddings=128), stop_tokens=["[/CONFORMER]"], max_new_tokens=4)
    loss, stats = policy.supervised_loss(batch)
    assert torch.isfinite(loss) and stats["target_tokens"] == float((batch["labels"] != M).sum())
    assert stats["num_tokens"] == float(batch["attention_mask"].sum())
