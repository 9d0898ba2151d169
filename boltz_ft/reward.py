"""Structure rewards for GRPO over Boltz-2's diffusion sampler (boltz.md §5.2 rewards, §5.3 contracts).

:class:`StructureReward` scores each sample's final structure against its group's target. Every channel is
"higher is better"; the physical ones are minus a penalty:

- ``lddt_ca``: Cα-lDDT against the truth (R1), in [0, 1], no superposition.
- ``neg_rmsd``: minus the Cα RMSD after Kabsch superposition (Å), <= 0.
- ``tm_score``: Cα TM-score of the protein tokens (:func:`boltz_ft.metrics.tm_score`, ``tm_method``), in [0, 1].
- ``clash``: minus the clash fraction (R3; ``clash_normalize`` pairs or atoms), in [-1, 0].
- ``chain_break``: minus the mean |d(Cα_i, Cα_i+1) − 3.8 Å| over consecutive protein residues (Å), <= 0.
- ``interface_lddt``: Cα-lDDT over the pairs of tokens in different chains (R6), in [0, 1].
- ``proxy``: lddt_ca − proxy_clash_weight·clash_fraction − proxy_break_weight·chain_break (the spec's default
  with weights 0.5 and 0.1). A penalty that is undefined for the target (no eligible pair) counts as 0 here.

Rollout contract (the Boltz GRPO policy): ``group_ids [B]`` in ``[0, P)``; ``group_payload["feat/<key>"]``
``[P, ...]`` the merged input and target features of each group's target; ``payload["coords"] [B, M, 3]`` the
final structures; optional ``info["target_ids"]``, P names. A failed sample gets NaN (the engine's penalty),
counted per reason: ``nonfinite_coords`` (fails every channel), ``metric_error`` (a metric raised),
``no_interface`` (no scored inter-chain pair, e.g. one chain) and ``undefined_metric`` (a non-finite value).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from boltz_ft.metrics import LDDT_THRESHOLDS, PROTEIN, ca_coords, chain_break, clash_fraction, kabsch_rmsd, lddt
from boltz_ft.metrics import tm_score, tmalign_available
from elign.engine.errors import ConfigError, check_int, check_range
from elign.engine.rollout import RewardOutput, Rollout

log = logging.getLogger(__name__)

# channel -> the metrics it is built from
CHANNELS: dict[str, tuple[str, ...]] = {
    "lddt_ca": ("lddt_ca",), "neg_rmsd": ("rmsd_ca",), "tm_score": ("tm_score",), "clash": ("clash_fraction",),
    "chain_break": ("chain_break",), "interface_lddt": ("interface_lddt",),
    "proxy": ("lddt_ca", "clash_fraction", "chain_break"),
}
FEATURES = ("coords", "token_to_center_atom", "atom_pad_mask", "atom_resolved_mask", "token_pad_mask", "asym_id",
            "residue_index", "mol_type", "atom_to_token", "ref_element")
RAW_METRICS = ("clash_fraction", "chain_break")  # logged as <name>_raw means (the channels carry minus them)


class Undefined(Exception):
    """A metric that does not exist for a target (e.g. no interface); ``reason`` names the failure."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class Target:
    """One group's target, unbatched. N tokens, M atoms.

    Attributes:
        feats: the flat feature dict (``feat/`` stripped). true_ca: ``[N,3]`` truth centre atoms.
        center: ``[N,M]`` float one-hot of each token's centre atom. resolved: ``[N]`` tokens whose centre atom is
        resolved. protein: ``[N]`` resolved protein tokens. element: ``[M]`` atomic numbers.
        bonds: ``[N,N]`` token bonds or None.
    """

    feats: dict[str, Tensor]
    true_ca: Tensor
    center: Tensor
    resolved: Tensor
    protein: Tensor
    element: Tensor
    bonds: Tensor | None

    @classmethod
    def from_payload(cls, group_payload: dict[str, Tensor], row: int, device: torch.device) -> "Target":
        """Group ``row``'s features that the metrics read (``feat/<key>`` ``[P, ...]`` -> ``<key>``), on ``device``."""
        f = {k: group_payload[f"feat/{k}"][row].to(device) for k in (*FEATURES, "token_bonds")
             if f"feat/{k}" in group_payload}
        true = (f["coords"][0] if f["coords"].dim() == 3 else f["coords"]).float()
        center = f["token_to_center_atom"].float()
        resolved = (center @ f["atom_resolved_mask"].float() > 0.5) & f["token_pad_mask"].bool()
        bonds = f.get("token_bonds")
        bonds = bonds[..., 0] if bonds is not None and bonds.dim() == 3 else bonds
        return cls(f, center @ true, center, resolved, resolved & (f["mol_type"] == PROTEIN),
                   f["ref_element"].argmax(-1), bonds)


def interface_lddt(pred: Tensor, true: Tensor, mask: Tensor, chain: Tensor, cutoff: float = 15.0) -> Tensor:
    """lDDT over the pairs of masked points in different chains (R6): ``[S,N,3], [N,3], [N], [N] -> [S]``.

    Same per-pair score as :func:`boltz_ft.metrics.lddt`. Raises :class:`Undefined` ("no_interface") when no
    inter-chain pair lies within ``cutoff`` in the truth.
    """
    exact = "donot_use_mm_for_euclid_dist"
    d_true, d_pred = torch.cdist(true, true, compute_mode=exact), torch.cdist(pred, pred, compute_mode=exact)
    m = mask.bool()
    pair = m[:, None] & m[None, :] & (chain[:, None] != chain[None, :]) & (d_true < cutoff)
    if not bool(pair.any()):
        raise Undefined("no_interface")
    l1 = (d_pred - d_true).abs()
    score = sum((l1 < t).to(pred.dtype) for t in LDDT_THRESHOLDS) / len(LDDT_THRESHOLDS)
    return (score * pair).sum((-2, -1)) / pair.sum()


class StructureReward:
    """Structure channels of Boltz-2 samples against their group's target (boltz.md §5.2); see the module doc."""

    def __init__(self, channels: Sequence[str] = ("proxy",), tm_method: str = "auto", clash_normalize: str = "pairs",
                 clash_scale: float = 0.75, lddt_cutoff: float = 15.0, proxy_clash_weight: float = 0.5,
                 proxy_break_weight: float = 0.1, target_metrics: int = 8) -> None:
        """
        Args:
            channels: channel names, among :data:`CHANNELS`.
            tm_method: ``auto | tmalign | approx`` (:func:`boltz_ft.metrics.tm_score`).
            clash_normalize: ``pairs`` (clashing / eligible heavy-atom pairs) or ``atoms`` (clashing atoms).
            clash_scale: a clash is a distance below clash_scale·(vdW_i + vdW_j).
            lddt_cutoff: lDDT inclusion radius in the truth (Å), for lddt_ca and interface_lddt.
            proxy_clash_weight, proxy_break_weight: the proxy's weights of the clash fraction and chain break (Å).
            target_metrics: per-target channel means are logged for at most this many targets (0 = none).
        """
        names = [channels] if isinstance(channels, str) else list(channels)
        if not names or len(set(names)) != len(names) or any(n not in CHANNELS for n in names):
            raise ConfigError("channels", names, f"a non-empty list of distinct names among {', '.join(CHANNELS)}")
        if tm_method not in ("auto", "tmalign", "approx"):
            raise ConfigError("tm_method", tm_method, ("auto", "tmalign", "approx"))
        if tm_method == "tmalign" and not tmalign_available():
            raise ConfigError("tm_method", tm_method, "auto or approx (tmtools is not installed)")
        if clash_normalize not in ("pairs", "atoms"):
            raise ConfigError("clash_normalize", clash_normalize, ("pairs", "atoms"))
        self.channels, self.tm_method, self.clash_normalize = names, tm_method, clash_normalize
        self.clash_scale = check_range("clash_scale", clash_scale, 0, low_open=True)
        self.lddt_cutoff = check_range("lddt_cutoff", lddt_cutoff, 0, low_open=True)
        self.proxy_clash_weight = check_range("proxy_clash_weight", proxy_clash_weight, 0)
        self.proxy_break_weight = check_range("proxy_break_weight", proxy_break_weight, 0)
        self.target_metrics = check_int("target_metrics", target_metrics, 0)
        self.metrics = list(dict.fromkeys(m for n in names for m in CHANNELS[n]))
        self._functions: dict[str, Callable[[Target, Tensor, Tensor], Tensor]] = {
            "lddt_ca": lambda t, x, ca: lddt(ca, t.true_ca, t.resolved, cutoff=self.lddt_cutoff),
            "rmsd_ca": lambda t, x, ca: kabsch_rmsd(ca, t.true_ca, t.resolved),
            "tm_score": lambda t, x, ca: tm_score(ca, t.true_ca, t.protein, method=self.tm_method),
            "clash_fraction": lambda t, x, ca: clash_fraction(
                x, t.feats["atom_pad_mask"], t.feats["atom_to_token"], t.feats["asym_id"], t.feats["residue_index"],
                t.element, token_bonds=t.bonds, scale=self.clash_scale, normalize=self.clash_normalize),
            "chain_break": lambda t, x, ca: chain_break(ca, t.feats["asym_id"], t.feats["residue_index"],
                                                        t.feats["token_pad_mask"], t.feats["mol_type"]),
            "interface_lddt": lambda t, x, ca: interface_lddt(ca, t.true_ca, t.resolved, t.feats["asym_id"],
                                                              cutoff=self.lddt_cutoff),
        }

    def __call__(self, rollout: Rollout) -> RewardOutput:
        """Channels ``[B]`` (float64, NaN = failed), failure counts and diagnostics of one rollout."""
        missing = [f"feat/{k}" for k in FEATURES if f"feat/{k}" not in rollout.group_payload]
        if missing or "coords" not in rollout.payload:
            raise KeyError(f"StructureReward needs payload['coords'] and group_payload {missing or ''} "
                           "(the Boltz GRPO policy's rollout)")
        coords = rollout.payload["coords"].detach()
        group_ids = rollout.group_ids.to(coords.device)
        b = coords.shape[0]
        values = {m: torch.full((b,), float("nan"), dtype=torch.float64) for m in self.metrics}
        errored = {m: torch.zeros(b, dtype=torch.bool) for m in self.metrics}
        reasons: dict[str, Tensor] = {}
        with torch.no_grad():
            for g in group_ids.unique().tolist():
                idx = (group_ids == g).nonzero()[:, 0]
                self._score_group(rollout.group_payload, int(g), coords[idx], idx.cpu(), values, errored, reasons)
        channels = {name: self._channel(name, values, errored) for name in self.channels}
        failures = {r: int(mask.sum()) for r, mask in reasons.items() if bool(mask.any())}
        return RewardOutput(channels=channels, failures=failures,
                            metrics=self._metrics(values, channels, rollout))

    def _score_group(self, group_payload: dict[str, Tensor], row: int, x: Tensor, idx: Tensor,
                     values: dict[str, Tensor], errored: dict[str, Tensor], reasons: dict[str, Tensor]) -> None:
        """Fill ``values[m][idx]`` with the metrics of the S samples ``x [S,M,3]`` of group ``row`` (in place)."""
        b = next(iter(values.values())).shape[0]

        def fail(reason: str, where: Tensor) -> None:
            reasons.setdefault(reason, torch.zeros(b, dtype=torch.bool))[idx[where.cpu()]] = True

        try:
            target = Target.from_payload(group_payload, row, x.device)
            real = target.feats["atom_pad_mask"].bool()
            finite = torch.isfinite(x[:, real]).flatten(1).all(-1)  # [S]
            # Zero the failed samples and the padding atoms (one-hot einsums turn a padded NaN into NaN).
            x = torch.where(finite[:, None, None] & real[None, :, None], x.float(), 0.0)
            pred_ca = ca_coords(x, target.center)
        except Exception:  # noqa: BLE001 - a malformed target fails its samples, not the run
            log.warning("StructureReward: cannot prepare the target of group %d", row, exc_info=True)
            fail("metric_error", torch.ones(len(idx), dtype=torch.bool))
            for m in self.metrics:
                errored[m][idx] = True
            return
        fail("nonfinite_coords", ~finite)
        for m in self.metrics:
            try:
                v = self._functions[m](target, x, pred_ca).detach().to("cpu", torch.float64)
                fail("undefined_metric", finite.cpu() & ~torch.isfinite(v))
            except Undefined as exc:
                v = torch.full((len(idx),), float("nan"), dtype=torch.float64)
                fail(exc.reason, finite)
            except Exception:  # noqa: BLE001 - one failing metric fails its samples only
                log.warning("StructureReward: metric %s failed on group %d", m, row, exc_info=True)
                v = torch.full((len(idx),), float("nan"), dtype=torch.float64)
                fail("metric_error", finite)
                errored[m][idx] = True
            values[m][idx] = torch.where(finite.cpu() & torch.isfinite(v), v, float("nan"))

    def _channel(self, name: str, values: dict[str, Tensor], errored: dict[str, Tensor]) -> Tensor:
        """One channel ``[B]`` from the metric values (higher is better; NaN = failed)."""
        if name == "proxy":
            def penalty(m: str) -> Tensor:  # undefined for the target (no eligible pair) -> no penalty
                return torch.where(torch.isnan(values[m]) & ~errored[m], 0.0, values[m])

            out = (values["lddt_ca"] - self.proxy_clash_weight * penalty("clash_fraction")
                   - self.proxy_break_weight * penalty("chain_break"))
        else:
            metric = CHANNELS[name][0]
            out = -values[metric] if metric in ("rmsd_ca", "clash_fraction", "chain_break") else values[metric].clone()
        return torch.where(torch.isfinite(out), out, float("nan"))

    def _metrics(self, values: dict[str, Tensor], channels: dict[str, Tensor], rollout: Rollout) -> dict[str, float]:
        """Raw means of the penalties and, with ``info["target_ids"]``, per-target channel means."""
        def mean(v: Tensor) -> float:
            ok = torch.isfinite(v)
            return float(v[ok].mean()) if bool(ok.any()) else float("nan")

        out = {f"{m}_raw": mean(values[m]) for m in RAW_METRICS if m in values}
        names = rollout.info.get("target_ids")
        p = next(iter(rollout.group_payload.values())).shape[0]
        if self.target_metrics and names is not None and len(names) == p:
            group_ids = rollout.group_ids.cpu()
            targets = list(dict.fromkeys(str(names[g]) for g in group_ids.unique().tolist()))[:self.target_metrics]
            for target in targets:
                rows = torch.tensor([str(n) == target for n in names])[group_ids]
                out.update({f"reward_target/{target}/{c}": mean(v[rows]) for c, v in channels.items()})
        return out
