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
    model, tokenizer = load_masked_lm(args.model)
    rows = read_rows(args.data)
    sequences = {m: [find_tagged(r["completion"])[1] for r in rows if r["modality"] == m][:args.limit]
                 for m in MODALITIES}
    print(f"model {args.model} ({sum(p.numel() for p in model.parameters()):,} parameters), {args.threads} thread(s), "
          f"batch {args.batch_size}, max_positions {args.max_positions}")
    print("| modality | sequences | mean length | unmasked_mean seq/s | masked_pll seq/s | masked_pll rows/s |")
    print("|---|---:|---:|---:|---:|---:|")
    for modality, seqs in sequences.items():
        rates = {}
        for mode in ("unmasked_mean", "masked_pll"):
            scorer = MaskedLMScorer(model, tokenizer, mode=mode, batch_size=args.batch_size,
                                    max_positions=args.max_positions, modality_tokens=MODALITY_TOKENS)
            scorer.score(seqs[:4], modality)  # warm-up
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                scorer.score(seqs, modality)
                times.append(time.perf_counter() - start)
            rates[mode] = len(seqs) / statistics.median(times)
        lengths = [len(s) for s in seqs]
        rows_per_seq = statistics.mean(min(n, args.max_positions or n) for n in lengths)
        print(f"| {modality} | {len(seqs)} | {statistics.mean(lengths):.0f} | {rates['unmasked_mean']:,.0f} | "
              f"{rates['masked_pll']:,.1f} | {rates['masked_pll'] * rows_per_seq:,.0f} |")


if __name__ == "__main__":
    main()
