"""GRPOStrategy.loss against TRL's own ``GRPOTrainer._compute_loss`` on tiny tensors.

TRL's method is called unbound on a stand-in ``self`` that carries the attributes it reads, and
whose ``_get_per_token_logps_and_entropies`` returns our log-probs: no model, no tokenizer, no
download. Marked slow: importing TRL takes about 10 s of CPU."""

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from elign.engine.rollout import StepLogProbs
from elign.engine.strategies.base import BatchCounts, LossInputs
from elign.engine.strategies.grpo import GRPOStrategy

pytestmark = pytest.mark.slow


class _Accelerator:
    def __init__(self, num_processes: int) -> None:
        self.num_processes = num_processes
        self.sync_gradients = True

    def gather(self, x):
        return x

    def gather_for_metrics(self, x):
        return x

    def reduce(self, x, reduction="sum"):
        return x


def trl_loss(logp, logp_old, adv, mask, ref_logp=None, *, loss_type, level, eps_low, eps_high, delta, beta,
             grad_acc=1, num_processes=1, num_items=None, kl_fix=False):
    """TRL's loss of one micro-batch (``grad_acc`` micro-batches per optimizer step, one generation
    batch per step), and the metrics it logged."""
    trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer")  # here: a deselected run never imports TRL
    b, t = logp.shape
    stub = SimpleNamespace(
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level=level, beta=beta,
        args=SimpleNamespace(use_bias_correction_kl=kl_fix, delta=delta, steps_per_generation=grad_acc),
        loss_type=loss_type, epsilon_low=eps_low, epsilon_high=eps_high, use_vllm=False,
        model=SimpleNamespace(training=True), current_gradient_accumulation_steps=grad_acc, max_completion_length=t,
        accelerator=_Accelerator(num_processes), _entropy_bonus_enabled=False, aux_loss_enabled=False,
        _metrics={"train": defaultdict(list)},
        _get_per_token_logps_and_entropies=lambda *args, **kw: (logp, torch.zeros_like(logp), None),
    )
    inputs = {
        "prompt_ids": torch.zeros(b, 1, dtype=torch.long), "prompt_mask": torch.ones(b, 1, dtype=torch.long),
        "completion_ids": torch.zeros(b, t, dtype=torch.long), "completion_mask": mask.long(),
        "advantages": adv, "old_per_token_logps": logp_old,
        "num_items_in_batch": torch.tensor(float(mask.sum() if num_items is None else num_items)),
    }
    if ref_logp is not None:
        inputs["ref_per_token_logps"] = ref_logp
    loss = trl_grpo.GRPOTrainer._compute_loss(stub, None, inputs)
    return loss, {k: v[-1] for k, v in stub._metrics["train"].items()}


def case(seed, lengths, t=7):
    g = torch.Generator().manual_seed(seed)
    b = len(lengths)
    logp = -torch.rand(b, t, generator=g, dtype=torch.float64) * 3
    logp_old = logp + 0.3 * torch.randn(b, t, generator=g, dtype=torch.float64)  # ratios on both sides of the clip
    ref_logp = logp + 0.2 * torch.randn(b, t, generator=g, dtype=torch.float64)
    adv = torch.randn(b, generator=g, dtype=torch.float64)
    mask = torch.arange(t).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
    return logp, logp_old, ref_logp, adv, mask


def counts(mask, world_size=1, global_tokens=None):
    tokens = float(mask.sum())
    return BatchCounts(tokens=tokens, sequences=float(mask.any(1).sum()), samples=float(mask.shape[0]),
                       global_tokens=tokens if global_tokens is None else global_tokens,
                       global_sequences=float(mask.any(1).sum()), world_size=world_size, max_steps=mask.shape[1])


def ours(strategy, logp, logp_old, ref_logp, adv, mask, c):
    ref = StepLogProbs(logp=logp, ref_logp=ref_logp) if strategy.beta > 0 else None
    return strategy.loss(LossInputs(logp=logp, logp_old=logp_old, advantages=adv.unsqueeze(1).expand_as(logp),
                                    mask=mask, seq_tokens=mask.sum(1), counts=c, reference=ref))


CONFIGS = [
    dict(loss_type=lt, level=level, eps_low=0.2, eps_high=eh, delta=delta, beta=beta, kl_fix=kl_fix)
    for lt in ("grpo", "bnpo", "dr_grpo", "dapo")
    for level, eh, delta, beta, kl_fix in [("token", 0.2, None, 0.0, False), ("token", 0.28, 1.5, 0.04, False),
                                           ("token", 0.28, 1.5, 0.04, True), ("sequence", 0.28, None, 0.04, False),
                                           ("sequence", 0.28, None, 0.04, True)]
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_whole_batch_loss_gradient_and_metrics_match_trl(cfg):
    logp, logp_old, ref_logp, adv, mask = case(0, [3, 7, 1, 5, 6, 2])
    strategy = GRPOStrategy(loss_type=cfg["loss_type"], importance_sampling=cfg["level"], epsilon_low=cfg["eps_low"],
                            epsilon_high=cfg["eps_high"], delta=cfg["delta"], beta=cfg["beta"],
                            kl_ratio_correction=cfg["kl_fix"])
    a = logp.clone().requires_grad_(True)
    loss, sums = ours(strategy, a, logp_old, ref_logp, adv, mask, counts(mask))
    loss.backward()
    b = logp.clone().requires_grad_(True)
    ref_loss, metrics = trl_loss(b, logp_old, adv, mask, ref_logp if cfg["beta"] else None, **cfg)
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-15)
    n = float(sums["count"])
    if cfg["beta"]:
        assert float(sums["kl"]) / n == pytest.approx(metrics["kl"], rel=1e-12)
    if cfg["level"] == "token":  # at the sequence level TRL counts clipped sequences, we count their tokens
        # (TRL averages the indicators in float32)
        assert float(sums["clipped_low"]) / n == pytest.approx(metrics["clip_ratio/low_mean"], rel=1e-6)
        assert float(sums["clipped_high"]) / n == pytest.approx(metrics["clip_ratio/high_mean"], rel=1e-6)
        assert float(sums["clipped"]) / n == pytest.approx(metrics["clip_ratio/region_mean"], rel=1e-6)
        assert 0 < metrics["clip_ratio/region_mean"] < 1  # the case exercises the clip


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_gradient_accumulation_matches_trl(loss_type):
    # Two micro-batches of 3 sequences and 12 tokens each: TRL's bnpo is a mean of micro-batch means,
    # which is the step's token mean only when the micro-batches hold the same number of tokens.
    logp, logp_old, ref_logp, adv, mask = case(1, [3, 5, 4, 4, 4, 4])
    strategy = GRPOStrategy(loss_type=loss_type, epsilon_high=0.28)
    c = counts(mask)
    total, ref_total = 0.0, 0.0
    for rows in (slice(0, 3), slice(3, 6)):
        loss, _ = ours(strategy, logp[rows], logp_old[rows], None, adv[rows], mask[rows], c)
        ref_loss, _ = trl_loss(logp[rows], logp_old[rows], adv[rows], mask[rows], loss_type=loss_type, level="token",
                               eps_low=0.2, eps_high=0.28, delta=None, beta=0.0, grad_acc=2,
                               num_items=float(mask.sum()))
        total, ref_total = total + loss, ref_total + ref_loss
    torch.testing.assert_close(total, ref_total, rtol=1e-12, atol=1e-15)


def test_dapo_across_ranks_matches_trl():
    logp, logp_old, _, adv, mask = case(2, [3, 7, 1, 5, 6, 2])
    strategy = GRPOStrategy(loss_type="dapo")
    global_tokens = float(mask.sum())
    for rows in (slice(0, 2), slice(2, 6)):  # two ranks with different token counts
        loss, _ = ours(strategy, logp[rows], logp_old[rows], None, adv[rows], mask[rows],
                       counts(mask[rows], world_size=2, global_tokens=global_tokens))
        ref_loss, _ = trl_loss(logp[rows], logp_old[rows], adv[rows], mask[rows], loss_type="dapo", level="token",
                               eps_low=0.2, eps_high=0.2, delta=None, beta=0.0, num_processes=2,
                               num_items=global_tokens)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-15)
