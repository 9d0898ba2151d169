"""The masked-LM scorer: lobster's unmasked mean against a hand computation, the exact pseudo-likelihood against a
brute-force loop over positions, position subsampling, and the pure functions."""

import math

import pytest
import torch
from torch import nn

from molgen_grpo.mlm_model import MODALITY_TOKENS, build_char_tokenizer, build_tiny_mlm
from molgen_grpo.mlm_scorer import (MaskedLMScorer, choose_positions, masked_copies, reduce_scores,
                                    token_log_probs)
from elign.engine.errors import ConfigError

TEXTS = ["CCO", "c1ccccc1O", "MKTAYIAKQR", "ACGTACGTTA"]


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer(TEXTS)


@pytest.fixture(scope="module")
def model(tokenizer):
    return build_tiny_mlm(len(tokenizer), tokenizer.pad_token_id, hidden_size=32, num_layers=2, num_heads=2,
                          intermediate_size=64, seed=0).eval()


class FixedLogits(nn.Module):
    """Every position's logits are log(w): p(token) = w[token] / sum(w), whatever the input."""

    def __init__(self, weights):
        super().__init__()
        self.logits_row = nn.Parameter(torch.log(torch.tensor(weights, dtype=torch.float32)))

    def forward(self, input_ids, attention_mask):
        return type("Out", (), {"logits": self.logits_row.expand(*input_ids.shape, -1)})()


def test_pure_functions_hand_cases():
    logits = torch.log(torch.tensor([[[1.0, 2.0, 1.0]] * 3]))  # p = [0.25, 0.5, 0.25]
    ids = torch.tensor([[1, 0, 2]])
    assert torch.allclose(token_log_probs(logits, ids), torch.log(torch.tensor([[0.5, 0.25, 0.25]])))
    values, mask = torch.tensor([[1.0, 2.0, 4.0], [3.0, 0.0, 0.0]]), torch.tensor([[1, 1, 0], [0, 0, 0]])
    assert reduce_scores(values, mask, "sum")[0] == 3.0 and reduce_scores(values, mask, "mean")[0] == 1.5
    assert torch.isnan(reduce_scores(values, mask, "mean")[1]) and torch.isnan(reduce_scores(values, mask, "sum")[1])
    assert masked_copies(torch.tensor([5, 6, 7]), torch.tensor([0, 2]), 9).tolist() == [[9, 6, 7], [5, 6, 9]]


def test_unmasked_mean_matches_the_hand_computation(tokenizer):
    weights = [1.0 + i % 3 for i in range(len(tokenizer))]
    logp = [math.log(w / sum(weights)) for w in weights]
    scorer = MaskedLMScorer(FixedLogits(weights), tokenizer, mode="unmasked_mean", temperature=0.1)
    scores = scorer.score(["CCO", "c1ccccc1O"], "smiles")
    for text, score in zip(["CCO", "c1ccccc1O"], scores):
        ids = tokenizer(text)["input_ids"]  # no modality prefix configured
        # lobster's mean includes the special tokens (here the trailing <eos>), divided by the temperature.
        assert ids[-1] == tokenizer.eos_token_id
        assert float(score) == pytest.approx(sum(logp[i] for i in ids) / len(ids) / 0.1, rel=1e-6)
    total = MaskedLMScorer(FixedLogits(weights), tokenizer, normalize="sum").score(["CCO"], "smiles")
    assert float(total) == pytest.approx(sum(logp[i] for i in tokenizer("CCO")["input_ids"]), rel=1e-6)


def brute_force_pll(model, tokenizer, text, prefix):
    """One forward per position, batch of one: log p(true token | the rest) summed over non-special tokens."""
    enc = tokenizer(prefix + text, return_special_tokens_mask=True)
    ids = enc["input_ids"]
    special = [int(i in tokenizer.all_special_ids) for i in ids]
    total, count = 0.0, 0
    with torch.no_grad():
        for pos in range(len(ids)):
            if special[pos]:
                continue
            masked = list(ids)
            masked[pos] = tokenizer.mask_token_id
            logits = model(input_ids=torch.tensor([masked]), attention_mask=torch.ones(1, len(ids))).logits
            total += float(torch.log_softmax(logits[0, pos].float(), -1)[ids[pos]])
            count += 1
    return total, count


def test_masked_pll_equals_a_brute_force_loop(model, tokenizer):
    texts, modality = ["CCO", "c1ccccc1O", "MKTAYIAKQR"], "smiles"
    scorer = MaskedLMScorer(model, tokenizer, mode="masked_pll", normalize="sum", batch_size=5,
                            modality_tokens=MODALITY_TOKENS)
    scores = scorer.score(texts, modality)  # copies of different sequences share forwards (batch of 5)
    for text, score in zip(texts, scores):
        total, count = brute_force_pll(model, tokenizer, text, MODALITY_TOKENS[modality])
        assert count == len(text)  # the modality token and <eos> are special: never masked
        assert float(score) == pytest.approx(total, rel=1e-5, abs=1e-5)
    mean = MaskedLMScorer(model, tokenizer, mode="masked_pll", modality_tokens=MODALITY_TOKENS).score(texts, modality)
    assert torch.allclose(mean, scores / torch.tensor([len(t) for t in texts], dtype=torch.float64), rtol=1e-5)


def test_masked_pll_subsamples_positions_reproducibly(model, tokenizer):
    capped = MaskedLMScorer(model, tokenizer, mode="masked_pll", normalize="sum", max_positions=4, seed=3)
    a, b = capped.score(["MKTAYIAKQR"], "protein"), capped.score(["MKTAYIAKQR"], "protein")
    assert torch.equal(a, b)  # the same positions for the same sequence
    positions = choose_positions(torch.arange(10), 4, 3, "MKTAYIAKQR")
    assert positions.numel() == 4 and positions.tolist() == sorted(set(positions.tolist()))
    mean_of_subset = MaskedLMScorer(model, tokenizer, mode="masked_pll", max_positions=4, seed=3).score(
        ["MKTAYIAKQR"], "protein")
    assert float(a) == pytest.approx(float(mean_of_subset) * 10, rel=1e-6)  # sum = subset mean x 10 positions


def test_config_errors_name_the_key(tokenizer):
    with pytest.raises(ConfigError, match="mode"):
        MaskedLMScorer(FixedLogits([1.0] * len(tokenizer)), tokenizer, mode="pll")
    with pytest.raises(ConfigError, match="temperature"):
        MaskedLMScorer(FixedLogits([1.0] * len(tokenizer)), tokenizer, temperature=0.0)
