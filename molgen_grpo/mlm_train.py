"""Train the project's tiny multi-modal masked LM (the offline stand-in for UME) and measure it.

    python -m molgen_grpo.mlm_train --out molgen_grpo/weights/mlm_tiny          # the shipped model (~3 min CPU)
    python -m molgen_grpo.mlm_train --out /tmp/mlm --steps 200 --max-smiles 500 # a quick one

The corpus is :mod:`molgen_grpo.mlm_corpus` (QM9 SMILES, real PDB protein chains, synthetic coding DNA). Each
training sequence is ``<cls_modality> sequence <eos>`` (UME's layout), long ones randomly cropped; the
modality of each row is drawn uniformly, so the few proteins are seen as often as the many molecules.
Masking is transformers' ``DataCollatorForLanguageModeling`` (15 %, 80/10/10). The folder gets the model and
tokenizer (``save_pretrained``) and ``training.json``: the command, the corpus and its sources, the loss
curve and the held-out masked-token accuracy per modality beside the majority-token baseline.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from molgen_grpo.mlm_corpus import Corpus, build_corpus, library_structures
from molgen_grpo.mlm_model import MODALITY_TOKENS, build_char_tokenizer, build_tiny_mlm

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def crop(sequence: str, length: int, rng: random.Random) -> str:
    """A random window of ``length`` characters (the whole sequence when shorter)."""
    if len(sequence) <= length:
        return sequence
    start = rng.randrange(len(sequence) - length + 1)
    return sequence[start:start + length]


def draw_batch(corpus: Corpus, batch_size: int, max_chars: int, rng: random.Random) -> list[str]:
    """``batch_size`` texts ``<cls_m>sequence``, the modality of each drawn uniformly."""
    rows = []
    for _ in range(batch_size):
        modality = rng.choice(sorted(corpus.train))
        rows.append(MODALITY_TOKENS[modality] + crop(rng.choice(corpus.train[modality]), max_chars, rng))
    return rows


def collate(tokenizer: Any, collator: Any, texts: Sequence[str]) -> dict[str, torch.Tensor]:
    """Tokenize and mask a batch. The special-token mask is recomputed from the tokenizer's special ids: the
    modality token put in the text is special, but tokenizers mark only what their template added."""
    enc = tokenizer(list(texts))
    special = set(tokenizer.all_special_ids)
    rows = [{"input_ids": ids, "attention_mask": mask, "special_tokens_mask": [int(i in special) for i in ids]}
            for ids, mask in zip(enc["input_ids"], enc["attention_mask"])]
    return collator(rows)


@torch.no_grad()
def masked_accuracy(model: Any, tokenizer: Any, sequences: Sequence[str], prefix: str, max_chars: int,
                    seed: int = 0, rate: float = 0.15) -> dict[str, float]:
    """Top-1 accuracy on a seeded 15 % of the non-special positions of ``sequences``, each replaced by the mask
    token (``prefix`` + windows of ``max_chars`` tiling long sequences), and the majority-token baseline (always
    predicting the most frequent true token) on the same positions."""
    generator = torch.Generator().manual_seed(seed)
    windows = [prefix + t[i:i + max_chars] for t in sequences for i in range(0, len(t), max_chars)]
    correct = total = 0
    truth_counts: Counter[int] = Counter()
    for start in range(0, len(windows), 32):
        enc = tokenizer(windows[start:start + 32], padding=True, return_tensors="pt", return_special_tokens_mask=True)
        special = torch.isin(enc["input_ids"], torch.tensor(tokenizer.all_special_ids)) | ~enc["attention_mask"].bool()
        chosen = (torch.rand(enc["input_ids"].shape, generator=generator) < rate) & ~special
        inputs = enc["input_ids"].masked_fill(chosen, tokenizer.mask_token_id)
        logits = model(input_ids=inputs, attention_mask=enc["attention_mask"]).logits
        truth = enc["input_ids"][chosen]
        correct += int((logits[chosen].argmax(-1) == truth).sum())
        total += int(chosen.sum())
        truth_counts.update(truth.tolist())
    majority = truth_counts.most_common(1)[0][1] / total if total else float("nan")
    return {"accuracy": correct / total if total else float("nan"), "majority_baseline": majority,
            "masked_tokens": total}


def fit_steps(model: torch.nn.Module, batch_loss: Callable[[], torch.Tensor], steps: int, lr: float, desc: str,
              betas: tuple[float, float] = (0.9, 0.999), weight_decay: float = 0.0) -> list[float]:
    """``steps`` AdamW steps on ``batch_loss()`` (5 % linear warm-up, then cosine to 0; gradients clipped at norm 1),
    with a progress bar; the model is left in eval mode. Returns the loss of every step. Shared by this script and
    :mod:`molgen_grpo.mlm_writer`."""
    from tqdm import tqdm
    from transformers import get_cosine_schedule_with_warmup

    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=betas, weight_decay=weight_decay)
    schedule = get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=max(1, steps // 20),
                                               num_training_steps=steps)
    losses = []
    model.train()
    for _ in tqdm(range(steps), desc=desc, mininterval=5.0):
        loss = batch_loss()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


def train(corpus: Corpus, out: Path, steps: int, batch_size: int, max_chars: int, lr: float, seed: int,
          hidden_size: int, num_layers: int, command: str) -> dict[str, Any]:
    """Train, evaluate, save; returns what ``training.json`` holds."""
    from transformers import DataCollatorForLanguageModeling

    texts = [t for split in (corpus.train, corpus.heldout) for seqs in split.values() for t in seqs]
    tokenizer = build_char_tokenizer(texts)
    model = build_tiny_mlm(len(tokenizer), tokenizer.pad_token_id, hidden_size=hidden_size, num_layers=num_layers,
                           num_heads=4, intermediate_size=2 * hidden_size, max_positions=max_chars + 2, seed=seed)
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15)
    rng = random.Random(seed)
    torch.manual_seed(seed)
    start = time.perf_counter()

    def batch_loss() -> torch.Tensor:
        batch = collate(tokenizer, collator, draw_batch(corpus, batch_size, max_chars, rng))
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss

    losses = fit_steps(model, batch_loss, steps, lr, "mlm", weight_decay=0.01)
    report = {"command": command, "steps": steps, "batch_size": batch_size, "max_chars": max_chars, "lr": lr,
              "seed": seed, "hidden_size": hidden_size, "num_layers": num_layers,
              "parameters": sum(p.numel() for p in model.parameters()), "seconds": time.perf_counter() - start,
              "loss_first_last_100": [sum(losses[:100]) / len(losses[:100]), sum(losses[-100:]) / len(losses[-100:])],
              "corpus": {split: {m: {"sequences": len(v), "characters": sum(map(len, v))} for m, v in seqs.items()}
                         for split, seqs in (("train", corpus.train), ("heldout", corpus.heldout))},
              "sources": corpus.sources, "heldout_masked_accuracy": {}}
    for modality, seqs in corpus.heldout.items():
        report["heldout_masked_accuracy"][modality] = masked_accuracy(model, tokenizer, seqs, MODALITY_TOKENS[modality],
                                                                      max_chars, seed)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for the model, tokenizer and training.json")
    parser.add_argument("--smiles", type=Path, default=SHARED / "qm9_smiles.txt", help="SMILES, one per line")
    parser.add_argument("--pdb", type=Path, nargs="*", default=[SHARED / "pdb"],
                        help="PDB files or folders (the library-shipped structures are always added)")
    parser.add_argument("--max-smiles", type=int, default=20000, help="SMILES drawn from the file")
    parser.add_argument("--steps", type=int, default=3000, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=32, help="sequences per step")
    parser.add_argument("--max-chars", type=int, default=126, help="longest training window (characters)")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (5 % warm-up, then cosine)")
    parser.add_argument("--hidden-size", type=int, default=64, help="ModernBERT width")
    parser.add_argument("--layers", type=int, default=3, help="ModernBERT layers")
    parser.add_argument("--seed", type=int, default=0, help="corpus, initialisation and masking seed")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    files = [f for p in args.pdb for f in (sorted(p.glob("*.pdb")) if p.is_dir() else [p])] + library_structures()
    corpus = build_corpus(args.smiles, files, max_smiles=args.max_smiles, seed=args.seed)
    command = "python -m molgen_grpo.mlm_train " + " ".join(sys.argv[1:] if argv is None else argv)
    report = train(corpus, args.out, args.steps, args.batch_size, args.max_chars, args.lr, args.seed,
                   args.hidden_size, args.layers, command)
    print(f"{report['parameters']:,} parameters, {report['seconds']:.0f} s; loss {report['loss_first_last_100'][0]:.3f}"
          f" -> {report['loss_first_last_100'][1]:.3f}")
    for modality, acc in report["heldout_masked_accuracy"].items():
        print(f"held-out {modality:8s} masked-token accuracy {acc['accuracy']:.3f} (majority token "
              f"{acc['majority_baseline']:.3f}, {acc['masked_tokens']} masked tokens)")
    return report


if __name__ == "__main__":
    main()
