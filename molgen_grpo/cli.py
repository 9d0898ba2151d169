"""Sample, evaluate and report on conformer language models (spec §1.7), like the EDM's CLI.

    python -m molgen_grpo.cli sample   --run-dir RUN [--checkpoint PATH] --split test --seed 0 --out samples.json
    python -m molgen_grpo.cli sample   --model-config conf/model/molgen/qwen3_small_qm9.yaml --out samples.json
    python -m molgen_grpo.cli evaluate --samples samples.json [--posebusters] --out eval.json
    python -m molgen_grpo.cli report   --eval base.json --eval post.json [--label base --label post] \
                                       [--samples samples.json] [--run-dir RUN] --out-dir DIR
    python -m molgen_grpo.cli export   --run-dir RUN --out DIR     # a transformers model directory

``sample`` writes ``samples_per_reference × M`` completions per molecule (the protocol's 2M) as JSON
with where they came from; ``evaluate`` scores them (COV-R/P and MAT-R/P over 0.05-3.00 Å, parse,
graph-match and PoseBusters rates); ``report`` draws COV-R against the threshold for every evaluation
given, the generated conformers next to their nearest reference, and the run's training curves. A
missing or unreadable input ends the command with exit code 2 and one line naming the file.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from elign.engine.checkpoint import BEST, LATEST
from elign.engine.errors import ConfigError, DataFormatError
from molgen_grpo.evaluate import load_test_molecules, sample_completions, score_molecule, summarize

DEFAULT_DATA = "package:molgen_grpo/data/qm9_conformers"
SAMPLES_FORMAT = "molgen_grpo.samples/1"


def build_policy(a: argparse.Namespace) -> tuple[Any, str | None]:
    """The policy of a run directory (its ``config.yaml``) or of a model YAML, with the sampling
    options of the command line; returns it and the checkpoint it loaded."""
    checkpoint = a.checkpoint
    if a.run_dir is not None:
        config = Path(a.run_dir) / "config.yaml"
        if not config.is_file():
            raise DataFormatError(str(config), None, "no such file: not a run directory")
        cfg = OmegaConf.load(config).model
        if checkpoint is None:
            best, latest = Path(a.run_dir) / BEST, Path(a.run_dir) / LATEST
            checkpoint = str(best if best.is_file() else latest)
    elif a.model_config is not None:
        if not Path(a.model_config).is_file():
            raise DataFormatError(a.model_config, None, "no such model config")
        cfg = OmegaConf.load(a.model_config)
        checkpoint = checkpoint or cfg.get("checkpoint")
    else:
        raise SystemExit("give --run-dir or --model-config")
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise DataFormatError(str(checkpoint), None, "no such checkpoint")
    cfg.checkpoint = checkpoint
    for key in ("temperature", "top_p", "top_k", "max_new_tokens", "constrained"):
        value = getattr(a, key, None)
        if value is not None:
            cfg[key] = value
    cfg.do_sample = True
    return instantiate(cfg, _convert_="all"), checkpoint


def cmd_sample(a: argparse.Namespace) -> None:
    from tqdm.auto import tqdm

    torch.set_num_threads(a.threads)
    policy, checkpoint = build_policy(a)
    molecules = load_test_molecules(a.data, a.split, a.max_molecules)
    start = time.perf_counter()
    with tqdm(total=len(molecules), desc="molecules", disable=not sys.stderr.isatty()) as bar:
        completions = sample_completions(policy, molecules, a.samples_per_reference, a.seed,
                                         on_molecule=lambda _: bar.update())
    seconds = time.perf_counter() - start
    record = {
        "format": SAMPLES_FORMAT,
        "meta": {"run_dir": a.run_dir, "model_config": a.model_config, "checkpoint": checkpoint, "data": a.data,
                 "split": a.split, "seed": a.seed, "samples_per_reference": a.samples_per_reference,
                 "temperature": policy.temperature, "top_p": policy.top_p, "top_k": policy.top_k,
                 "constrained": policy.constrained, "max_new_tokens": policy.max_new_tokens,
                 "seconds": round(seconds, 2)},
        "molecules": [{"smiles": m.smiles, "references": m.source, "n_ref": len(m.references), "completions": c}
                      for m, c in zip(molecules, completions)],
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(record) + "\n", encoding="utf-8")
    total = sum(len(c) for c in completions)
    print(f"wrote {total} completions for {len(molecules)} molecules to {a.out} ({total / seconds:.1f} completions/s)")


def load_json(path: str, what: str, fmt: str | None = None) -> dict[str, Any]:
    """A JSON file written by one of the commands; a missing or foreign file is a DataFormatError."""
    if not Path(path).is_file():
        raise DataFormatError(path, None, f"no such {what}")
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataFormatError(path, getattr(exc, "lineno", None), f"not a JSON {what}") from None
    if fmt is not None and (not isinstance(data, dict) or data.get("format") != fmt):
        raise DataFormatError(path, None, f"not a {what} (format {fmt!r} expected)")
    return data


def cmd_evaluate(a: argparse.Namespace) -> None:
    from tqdm.auto import tqdm

    samples = load_json(a.samples, "samples file (written by `sample`)", SAMPLES_FORMAT)
    meta = samples["meta"]
    molecules = {m.smiles: m for m in load_test_molecules(meta["data"], meta["split"])}
    results = []
    for entry in tqdm(samples["molecules"], desc="molecules", disable=not sys.stderr.isatty()):
        if entry["smiles"] not in molecules:
            raise DataFormatError(a.samples, None, f"{entry['smiles']} is not a molecule of {meta['data']} "
                                                   f"split {meta['split']}")
        results.append(score_molecule(molecules[entry["smiles"]], entry["completions"], symmetry=not a.no_symmetry,
                                      posebusters=a.posebusters))
    summary = summarize(results)
    out = {"format": "molgen_grpo.eval/1", "samples": a.samples, "meta": meta, "symmetry": not a.no_symmetry,
           "summary": summary, "molecules": results}
    for at in ("at_0.5", "at_0.75"):
        h = summary[at]
        print(f"{at[3:]} Å: COV-R mean {h['cov_r_mean']:.3f} median {h['cov_r_median']:.3f} | "
              f"COV-P mean {h['cov_p_mean']:.3f} | MAT-R mean {h['mat_r_mean']:.3f} median {h['mat_r_median']:.3f} Å")
    pb = summary["posebusters_pass_rate"]
    print(f"parse {summary['parse_rate']:.3f} | graph match {summary['graph_match_rate']:.3f} | "
          f"PoseBusters {'not checked' if pb is None else f'{pb:.3f}'} | {summary['molecules']} molecules, "
          f"{summary['completions']} completions, {summary['molecules_without_valid']} without a valid conformer")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(out, allow_nan=True) + "\n", encoding="utf-8")
        print(f"wrote {a.out}")


def cmd_report(a: argparse.Namespace) -> None:
    from molgen_grpo.plots import draw_nearest, plot_coverage

    out_dir = Path(a.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    evals = [load_json(path, "evaluation (written by `evaluate`)", "molgen_grpo.eval/1") for path in a.eval]
    labels = a.label or [Path(path).stem for path in a.eval]
    if len(labels) != len(evals):
        raise SystemExit(f"give one --label per --eval ({len(evals)} evaluations, {len(labels)} labels)")
    print(f"wrote {plot_coverage([e['summary'] for e in evals], labels, out_dir / 'coverage.png')}")
    if a.samples:
        samples = load_json(a.samples, "samples file (written by `sample`)", SAMPLES_FORMAT)
        match = [e for e in evals if Path(e["samples"]).resolve() == Path(a.samples).resolve()]
        if not match:
            raise SystemExit(f"none of the --eval files scored {a.samples}")
        meta = samples["meta"]
        molecules = {m.smiles: m for m in load_test_molecules(meta["data"], meta["split"])}
        try:
            print(f"wrote {draw_nearest(samples['molecules'], match[0]['molecules'], molecules, out_dir / 'conformers.png')}")
        except ValueError as exc:  # no valid conformer at all: say so, the other pictures still come
            print(f"conformers.png not written: {exc}")
    if a.run_dir:
        from elign.engine.report import plot_curves

        print(f"wrote {plot_curves(a.run_dir, out_dir / 'curves.png')}")


def cmd_export(a: argparse.Namespace) -> None:
    a.checkpoint, a.model_config = a.checkpoint, None
    for key in ("temperature", "top_p", "top_k", "max_new_tokens", "constrained"):
        setattr(a, key, None)
    policy, checkpoint = build_policy(a)
    policy.save_pretrained(a.out)
    print(f"wrote a transformers model directory to {a.out} (weights of {checkpoint})")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m molgen_grpo.cli", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("sample", help="write 2M completions per held-out molecule")
    s.add_argument("--run-dir", help="run directory (config.yaml + checkpoints)")
    s.add_argument("--model-config", help="model YAML (conf/model/molgen/*.yaml) when there is no run directory")
    s.add_argument("--checkpoint", help="weights (default: the run's best, else latest checkpoint)")
    s.add_argument("--data", default=DEFAULT_DATA, help="conformer data folder (package: path allowed)")
    s.add_argument("--split", default="test", help="split whose molecules are prompted")
    s.add_argument("--max-molecules", type=int, default=None, help="the first N molecules of the split")
    s.add_argument("--samples-per-reference", type=int, default=2, help="completions per reference conformer")
    s.add_argument("--seed", type=int, default=0, help="sampling seed (each molecule: this seed and its SMILES, so subsets agree)")
    s.add_argument("--temperature", type=float, default=None, help="default: the model config's")
    s.add_argument("--top-p", dest="top_p", type=float, default=None, help="default: the model config's")
    s.add_argument("--top-k", dest="top_k", type=int, default=None, help="default: the model config's")
    s.add_argument("--max-new-tokens", dest="max_new_tokens", type=int, default=None, help="default: the model config's")
    s.add_argument("--constrained", action=argparse.BooleanOptionalAction, default=None,
                   help="force the prompt's topology (default: the model config's)")
    s.add_argument("--threads", type=int, default=2, help="torch threads")
    s.add_argument("--out", required=True, help="output JSON file")
    e = sub.add_parser("evaluate", help="COV/MAT, parse and PoseBusters rates of a samples file")
    e.add_argument("--samples", required=True, help="file written by `sample`")
    e.add_argument("--posebusters", action="store_true", help="run PoseBusters' molecule checks (~0.05 s each)")
    e.add_argument("--no-symmetry", action="store_true", help="AlignMol with one atom map instead of GetBestRMS")
    e.add_argument("--out", help="JSON output file")
    r = sub.add_parser("report", help="coverage plot, conformer pictures, training curves")
    r.add_argument("--eval", action="append", required=True, help="file written by `evaluate` (repeat to compare)")
    r.add_argument("--label", action="append", help="legend label per --eval")
    r.add_argument("--samples", help="samples file to draw (one of the evaluations must have scored it)")
    r.add_argument("--run-dir", help="run directory whose curves to plot")
    r.add_argument("--out-dir", required=True, help="folder for the PNG files")
    x = sub.add_parser("export", help="a transformers model directory (with tokenizer) from a run")
    x.add_argument("--run-dir", required=True, help="run directory (config.yaml + checkpoints)")
    x.add_argument("--checkpoint", help="weights (default: the run's best, else latest checkpoint)")
    x.add_argument("--out", required=True, help="output directory")
    a = p.parse_args(argv)
    try:
        {"sample": cmd_sample, "evaluate": cmd_evaluate, "report": cmd_report, "export": cmd_export}[a.command](a)
    except (ConfigError, DataFormatError) as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main(sys.argv[1:])
