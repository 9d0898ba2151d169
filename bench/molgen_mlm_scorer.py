"""Masked-LM scorer throughput (issue 18): sequences/s of ``unmasked_mean`` and ``masked_pll`` per modality.

    python bench/molgen_mlm_scorer.py                                   # the shipped tiny model, 1 thread
    python bench/molgen_mlm_scorer.py --model /path/to/masked-lm --threads 2 --max-positions 32

Sequences: the ``completion`` column of the shipped prompt dataset (``molgen_grpo/data/mlm_prompts/full.json``:
100 QM9 SMILES, 100 random proteins of 20-100 residues, 100 random DNA strings of 50-200 nt), scored per
modality in batches of ``--batch-size`` after one untimed warm-up call; the median of ``--repeats`` timed
passes. ``masked_pll`` runs one forward row per scored token, so its cost grows with sequence length;
``--max-positions`` caps the rows per sequence.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from molgen_grpo.mlm_model import MODALITY_TOKENS, load_masked_lm  # noqa: E402
from molgen_grpo.mlm_prompts import read_rows  # noqa: E402
from molgen_grpo.mlm_scorer import MaskedLMScorer  # noqa: E402
from molgen_grpo.modality import MODALITIES, find_tagged  # noqa: E402


def throughput(model_path: str, data: str, batch_size: int = 32, max_positions: int | None = None, repeats: int = 3,
               limit: int | None = None) -> list[dict[str, float | str]]:
    """Per modality: sequences, mean length, sequences/s of both modes and masked rows/s (module docstring)."""
    model, tokenizer = load_masked_lm(model_path)
    rows = read_rows(data)
    sequences = {m: [find_tagged(r["completion"])[1] for r in rows if r["modality"] == m][:limit] for m in MODALITIES}
    out = []
    for modality, seqs in sequences.items():
        rates = {}
        for mode in ("unmasked_mean", "masked_pll"):
            scorer = MaskedLMScorer(model, tokenizer, mode=mode, batch_size=batch_size, max_positions=max_positions,
                                    modality_tokens=MODALITY_TOKENS)
            scorer.score(seqs[:4], modality)  # warm-up
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                scorer.score(seqs, modality)
                times.append(time.perf_counter() - start)
            rates[mode] = len(seqs) / statistics.median(times)
        lengths = [len(s) for s in seqs]
        rows_per_seq = statistics.mean(min(n, max_positions or n) for n in lengths)
        out.append({"modality": modality, "sequences": len(seqs), "mean_length": statistics.mean(lengths),
                    "unmasked_mean_seq_per_s": rates["unmasked_mean"], "masked_pll_seq_per_s": rates["masked_pll"],
                    "masked_pll_rows_per_s": rates["masked_pll"] * rows_per_seq,
                    "parameters": sum(p.numel() for p in model.parameters())})
    return out


def print_table(rows: list[dict[str, float | str]]) -> None:
    print("| modality | sequences | mean length | unmasked_mean seq/s | masked_pll seq/s | masked_pll rows/s |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['modality']} | {r['sequences']} | {r['mean_length']:.0f} | {r['unmasked_mean_seq_per_s']:,.0f} | "
              f"{r['masked_pll_seq_per_s']:,.1f} | {r['masked_pll_rows_per_s']:,.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="package:molgen_grpo/weights/mlm_tiny", help="masked-LM folder or Hub id")
    parser.add_argument("--data", default="package:molgen_grpo/data/mlm_prompts/full.json", help="prompt rows")
    parser.add_argument("--batch-size", type=int, default=32, help="sequences / masked copies per forward")
    parser.add_argument("--max-positions", type=int, default=None, help="masked_pll: copies per sequence cap")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes (median shown)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--limit", type=int, default=None, help="score only the first N sequences per modality")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = throughput(args.model, args.data, args.batch_size, args.max_positions, args.repeats, args.limit)
    print(f"model {args.model} ({rows[0]['parameters']:,} parameters), {args.threads} thread(s), "
          f"batch {args.batch_size}, max_positions {args.max_positions}")
    print_table(rows)


if __name__ == "__main__":
    main()
