"""The policy of the masked-LM recipe: a tiny Qwen3 that answers lobster-style prompts with tagged sequences.

    python -m molgen_grpo.mlm_writer --out molgen_grpo/weights/qwen3_mlm_writer     # the shipped model
    python -m molgen_grpo.mlm_writer --out /tmp/writer --steps 50 --rows 300        # a quick one

lobster post-trains a pretrained chat LM that already writes sequences when asked. Offline there is none, so
this script makes the smallest honest stand-in: a random-init Qwen3 (:func:`molgen_grpo.model.build_model`)
with a character tokenizer (:func:`build_writer_tokenizer`), fine-tuned on instruction -> answer pairs
(:func:`sft_rows`): each of the three instructions of :mod:`molgen_grpo.mlm_prompts` followed by a tagged
answer and ``<|endoftext|>``. The SMILES answers are real QM9 molecules (``../shared/data/qm9_smiles.txt``, or
any file with one SMILES per line), the protein (20-100 residues) and DNA (50-200 nt) answers are uniformly
random, as in lobster's synthetic dataset. The loss is the next-token cross-entropy of the answer tokens
only (:meth:`molgen_grpo.policy.Qwen3Policy.supervised_loss`, labels -100 on the instruction).

The folder gets the model and tokenizer (``save_pretrained``; ``model=molgen/qwen3_mlm_writer`` loads it) and
``training.json``: the command, the loss curve, and on the held-out prompts of the shipped prompt set (test
split, seeded sampling) the share of answers whose tag parses, whose sequence is valid for its modality
(:func:`molgen_grpo.modality.check_sequence`) and whose tag matches the prompt's modality.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from elign.engine.paths import resolve_package_path
from molgen_grpo.mlm_eval import answer_rates, sample_answers
from molgen_grpo.mlm_prompts import AMINO_ACIDS, INSTRUCTIONS, TAG, read_rows
from molgen_grpo.modality import MODALITIES
from molgen_grpo.tokenizer import EOS_TOKEN, UNK_TOKEN

ROOT = Path(__file__).resolve().parents[1]
SHARED_SMILES = ROOT.parent / "shared" / "data" / "qm9_smiles.txt"
HELDOUT_PROMPTS = "package:molgen_grpo/data/mlm_prompts"
CHARACTERS = ("\n", *(chr(c) for c in range(0x20, 0x7F)))  # every instruction and answer character


def build_writer_tokenizer(padding_side: str = "left") -> Any:
    """A character-level causal-LM tokenizer: ``<|endoftext|>`` (0: pad and eos, as Qwen's), ``<|unk|>`` (1),
    then one token per printable ASCII character and newline, so any prompt or answer round-trips exactly."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([EOS_TOKEN, UNK_TOKEN, *CHARACTERS])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one piece per character
    core.decoder = decoders.Fuse()  # characters back into text without separators
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (EOS_TOKEN, UNK_TOKEN)])
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN,
                                   unk_token=UNK_TOKEN, padding_side=padding_side, clean_up_tokenization_spaces=False)


def answer(modality: str, sequence: str) -> str:
    """The tagged answer the reward reads, e.g. ``<dna>ACGT</dna>``."""
    return f"<{TAG[modality]}>{sequence}</{TAG[modality]}>"


def sft_rows(smiles: Sequence[str], rows: int, seed: int = 0) -> list[dict[str, str]]:
    """``rows`` pairs ``{prompt, completion, modality}``, modalities in turn; SMILES drawn from ``smiles``."""
    rng = random.Random(seed)
    out = []
    for i in range(rows):
        modality = MODALITIES[i % len(MODALITIES)]
        if modality == "smiles":
            sequence = rng.choice(smiles)
        elif modality == "protein":
            sequence = "".join(rng.choice(AMINO_ACIDS) for _ in range(rng.randint(20, 100)))
        else:
            sequence = "".join(rng.choice("ACGT") for _ in range(rng.randint(50, 200)))
        out.append({"prompt": INSTRUCTIONS[modality], "completion": answer(modality, sequence), "modality": modality})
    return out


def sft_batch(tokenizer: Any, rows: Sequence[dict[str, str]]) -> dict[str, torch.Tensor]:
    """``input_ids``, ``attention_mask``, pre-shifted ``labels`` ``[B, L]`` (right padded): targets are the
    answer tokens and the final ``<|endoftext|>``; the instruction and the padding are -100."""
    eos = tokenizer.eos_token_id
    seqs = []
    for row in rows:
        prompt = tokenizer.encode(row["prompt"], add_special_tokens=False)
        completion = tokenizer.encode(row["completion"], add_special_tokens=False) + [eos]
        seqs.append((prompt + completion, len(prompt)))
    width = max(len(ids) for ids, _ in seqs)
    ids = torch.full((len(seqs), width), eos, dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (row, start) in enumerate(seqs):
        ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
        labels[i, start - 1:len(row) - 1] = torch.tensor(row[start:])  # position t predicts token t + 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@torch.no_grad()
def heldout_rates(policy: Any, split: str = "test", samples_per_prompt: int = 4, seed: int = 0,
                  prompts: str = HELDOUT_PROMPTS) -> dict[str, float]:
    """:func:`molgen_grpo.mlm_eval.answer_rates` of seeded samples for each row of the prompt set's ``split``."""
    rows = read_rows(Path(resolve_package_path(prompts)) / f"{split}.json")
    completions = sample_answers(policy, rows, samples_per_prompt, seed)
    return answer_rates(completions, [row["modality"] for row in rows for _ in range(samples_per_prompt)])


def train(pairs: Sequence[dict[str, str]], out: Path, steps: int, batch_size: int, lr: float, seed: int,
          dims: dict[str, int], command: str) -> dict[str, Any]:
    """Fine-tune a random-init Qwen3 on ``pairs``, measure it on the held-out prompts, save; returns
    what ``training.json`` holds."""
    from molgen_grpo.mlm_train import fit_steps
    from molgen_grpo.model import build_model
    from molgen_grpo.policy import Qwen3Policy

    tokenizer = build_writer_tokenizer()
    torch.manual_seed(seed)
    model = build_model(len(tokenizer), init="random", max_position_embeddings=512, **dims)
    policy = Qwen3Policy(tokenizer, model, stop_tokens=[EOS_TOKEN], max_new_tokens=224, temperature=1.0)
    rng, pool = random.Random(seed), list(pairs)  # one list, sampled from at every step
    start = time.perf_counter()

    def batch_loss() -> torch.Tensor:
        return policy.supervised_loss(sft_batch(tokenizer, rng.sample(pool, min(batch_size, len(pool)))))[0]

    losses = fit_steps(model, batch_loss, steps, lr, "writer sft", betas=(0.9, 0.95))
    seconds = time.perf_counter() - start
    window = max(1, min(100, steps // 10))
    report = {"command": command, "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, **dims,
              "pairs": len(pairs), "parameters": sum(p.numel() for p in model.parameters()), "seconds": seconds,
              "loss_first_last": [sum(losses[:window]) / window, sum(losses[-window:]) / window],
              "heldout_test_split": heldout_rates(policy, "test", 8, seed)}
    out.mkdir(parents=True, exist_ok=True)
    policy.save_pretrained(str(out))
    (out / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for the model, tokenizer and training.json")
    parser.add_argument("--smiles", type=Path, default=SHARED_SMILES, help="SMILES answers, one per line")
    parser.add_argument("--rows", type=int, default=30000, help="instruction -> answer pairs (a third per modality)")
    parser.add_argument("--steps", type=int, default=2000, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=32, help="pairs per step")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (5 %% warm-up, then cosine)")
    parser.add_argument("--hidden-size", type=int, default=128, help="Qwen3 width")
    parser.add_argument("--layers", type=int, default=4, help="Qwen3 layers")
    parser.add_argument("--seed", type=int, default=0, help="data, initialisation and sampling seed")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    smiles = [s for s in (line.strip() for line in args.smiles.read_text().splitlines()) if s]
    if not smiles:
        raise SystemExit(f"error: {args.smiles} holds no SMILES")
    dims = {"hidden_size": args.hidden_size, "num_hidden_layers": args.layers, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": args.hidden_size // 4, "intermediate_size": 2 * args.hidden_size}
    command = "python -m molgen_grpo.mlm_writer " + " ".join(sys.argv[1:] if argv is None else argv)
    report = train(sft_rows(smiles, args.rows, args.seed), args.out, args.steps, args.batch_size, args.lr, args.seed,
                   dims, command)
    first, last = report["loss_first_last"]
    print(f"{report['parameters']:,} parameters, {report['seconds']:.0f} s; answer loss {first:.3f} -> {last:.3f}")
    print("held-out test prompts:", ", ".join(f"{k} {v:.3f}" for k, v in report["heldout_test_split"].items()))
    return report


if __name__ == "__main__":
    main()
