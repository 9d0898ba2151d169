"""The shipped pretrained model (molgen_grpo/weights/qwen3_small_qm9): a transformers directory that
the model config and AutoModelForCausalLM load, and that writes conformers of the prompted molecules."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from molgen_grpo.evaluate import HeldoutEvaluator  # noqa: E402
from molgen_grpo.tokenizer import resolve_path  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "conf/model/molgen/qwen3_small_qm9.yaml"


@pytest.fixture(scope="module")
def policy():
    torch.manual_seed(0)
    return instantiate(OmegaConf.load(CONFIG), _convert_="all")


def test_config_and_automodel_load_the_same_weights(policy):
    path = resolve_path(OmegaConf.load(CONFIG).model.path)
    loaded = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = policy.tokenizer("[SMILES]CC(=O)O[/SMILES]", return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, policy.module.eval()(ids).logits)
    assert sum(p.numel() for p in loaded.parameters()) < 1_000_000  # the small model, a few MB


def test_it_is_the_trained_model(policy):
    """Held-out loss far below a random model's ln(vocab) ~ 5.2, and most unconstrained completions
    parse with the prompt's graph (measured at export: loss 1.19, 22 of 32; thresholds leave margin for
    a sample that another CPU rounds differently)."""
    torch.set_num_threads(1)
    scores = HeldoutEvaluator("package:molgen_grpo/data/qm9_conformers", "valid", seq_len=512, max_rows=16,
                              num_molecules=8, samples_per_molecule=4)(policy)
    assert scores["loss"] < 1.4 < math.log(len(policy.tokenizer))
    assert scores["graph_match_rate"] >= 0.4
    assert scores["mat_r_mean"] < 1.5
