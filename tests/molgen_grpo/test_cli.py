"""The sample / evaluate / report / export commands: a perfect sampler's file scores COV-R 1 and
MAT-R ~0, a random model's samples file has 2M completions per molecule, bad inputs exit 2 naming
the file, and an exported run loads with AutoModelForCausalLM."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("rdkit")
pytest.importorskip("transformers")

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from rdkit import Chem  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from molgen_grpo.cli import SAMPLES_FORMAT, main  # noqa: E402
from molgen_grpo.evaluate import load_test_molecules  # noqa: E402
from molgen_grpo.text import encode  # noqa: E402

DATA = "package:molgen_grpo/data/qm9_conformers"
TINY_CONFIG = "conf/model/molgen/qwen3_tiny_random.yaml"


def perfect_samples(path, count=2):
    """A samples file whose completions are each reference written back twice (the 2M protocol)."""
    molecules = load_test_molecules(DATA, "test", count)
    entries = [{"smiles": m.smiles, "references": m.source, "n_ref": len(m.references),
                "completions": [f"[CONFORMER]{encode(Chem.RemoveHs(r)).enriched}[/CONFORMER]"
                                for r in m.references for _ in range(2)]} for m in molecules]
    path.write_text(json.dumps({"format": SAMPLES_FORMAT, "meta": {"data": DATA, "split": "test"},
                                "molecules": entries}))
    return molecules


def test_perfect_samples_score_full_coverage_and_draw(tmp_path, capsys):
    samples, scores = tmp_path / "samples.json", tmp_path / "eval.json"
    perfect_samples(samples)
    main(["evaluate", "--samples", str(samples), "--out", str(scores)])
    summary = json.loads(scores.read_text())["summary"]
    assert summary["parse_rate"] == summary["graph_match_rate"] == 1.0
    assert summary["at_0.5"]["cov_r_mean"] == 1.0 and summary["at_0.5"]["cov_p_mean"] == 1.0
    assert summary["at_0.5"]["mat_r_mean"] < 1e-3  # only the 4-decimal truncation separates them
    assert "COV-R mean 1.000" in capsys.readouterr().out
    out_dir = tmp_path / "report"
    main(["report", "--eval", str(scores), "--label", "perfect", "--samples", str(samples), "--out-dir", str(out_dir)])
    for name in ("coverage.png", "conformers.png"):
        assert (out_dir / name).stat().st_size > 10_000


def test_sample_writes_two_completions_per_reference(tmp_path):
    out = tmp_path / "s.json"
    main(["sample", "--model-config", TINY_CONFIG, "--max-molecules", "2", "--max-new-tokens", "8",
          "--threads", "1", "--seed", "5", "--out", str(out)])
    record = json.loads(out.read_text())
    assert record["format"] == SAMPLES_FORMAT
    assert record["meta"]["seed"] == 5 and record["meta"]["max_new_tokens"] == 8
    for entry in record["molecules"]:
        assert len(entry["completions"]) == 2 * entry["n_ref"]
    scores = tmp_path / "e.json"
    main(["evaluate", "--samples", str(out), "--out", str(scores)])
    assert json.loads(scores.read_text())["summary"]["parse_rate"] == 0.0  # 8 random tokens never parse
    main(["report", "--eval", str(scores), "--samples", str(out), "--out-dir", str(tmp_path / "r")])
    assert (tmp_path / "r" / "coverage.png").is_file() and not (tmp_path / "r" / "conformers.png").exists()


def test_bad_inputs_exit_2_naming_the_file(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "--samples", str(tmp_path / "missing.json")])
    assert exit_info.value.code == 2 and "missing.json" in capsys.readouterr().err
    foreign = tmp_path / "foreign.json"
    foreign.write_text('{"molecules": []}')
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "--samples", str(foreign)])
    assert exit_info.value.code == 2 and "foreign.json" in capsys.readouterr().err


def test_export_of_a_run_loads_with_automodel(tmp_path):
    from hydra.utils import instantiate

    run = tmp_path / "run"
    run.mkdir()
    cfg = OmegaConf.load(TINY_CONFIG)
    OmegaConf.save(OmegaConf.create({"model": cfg}), run / "config.yaml")
    torch.manual_seed(3)
    policy = instantiate(cfg, _convert_="all")
    torch.save({"model": policy.state_dict()}, run / "checkpoint_latest.pth")
    main(["export", "--run-dir", str(run), "--out", str(tmp_path / "hf")])
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = policy.tokenizer("[SMILES]CCO[/SMILES]", return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, policy.module.eval()(ids).logits, atol=1e-5)
