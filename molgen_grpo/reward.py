"""Conformer rewards for GRPO (spec §1.6): 3DMolGen's reward v3 and its legacy reward.

Reward v3 scores each prompt group (the ``K`` completions of one ``prompt_id``, never grouped by
prompt string) against the molecule's ``M`` reference conformers. A completion passes four gates in
order, and one that fails any gets ``r_floor``:

(a) ``decode``: a ``[CONFORMER]...[/CONFORMER]`` block that RDKit rebuilds;
(b) ``graph``: the block's SMILES is the prompt's graph (stereo ignored);
(c) ``posebusters``: PoseBusters in mode off / basic / geometry / full (an exception fails it too);
(d) ``rmsd``: a finite RMSD to some reference.

A valid completion earns ``w_qual r_qual + w_smcov r_smcov + w_match r_match``
(:mod:`molgen_grpo.reward_math`). Every gate failure is counted (``reward/failed_<gate>``); a prompt
whose molecule has no reference ensemble is an evaluation failure: NaN, which the engine turns into
``trainer.failure_penalty`` and counts (``reward/failed_no_reference``).
"""

from __future__ import annotations

import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from rdkit import Chem, rdBase
from scipy.stats import spearmanr

from elign.engine.errors import ConfigError, check_int, check_range
from elign.engine.rollout import RewardOutput, Rollout
from molgen_grpo.coverage import decode_conformer, rmsd_matrix
from molgen_grpo.posebusters_gate import PoseBustersGate
from molgen_grpo.references import ReferenceStore, prompt_smiles
from molgen_grpo.reward_math import CREDITS, hard_matching, legacy_match_term, legacy_rmsd_term, quality, smooth_coverage
from molgen_grpo.text import DecodeError, decode, same_graph, strip_smiles

GATES = ("decode", "graph", "posebusters", "rmsd")
_WORKER_STORE: ReferenceStore | None = None


def _conformer_block(text: str) -> str | None:
    """The text between ``[CONFORMER]`` and the first ``[/CONFORMER]`` after it, or None."""
    start = text.find("[CONFORMER]")
    if start < 0:
        return None
    end = text.find("[/CONFORMER]", start)
    return None if end < 0 else text[start + len("[CONFORMER]"):end].strip()


def _decode_and_match(block: str | None, smiles: str) -> tuple[Chem.Mol | None, bool]:
    """A conformer block's molecule (None unless gate a passes) and whether its graph is the prompt's (gate b)."""
    if block is None:
        return None, False
    try:
        mol = decode(block)
    except DecodeError:
        return None, False
    try:
        return mol, same_graph(strip_smiles(block), smiles)
    except DecodeError:
        return mol, False


def _init_worker(data_dir: str, max_references: int | None, jsonl_splits: Sequence[str]) -> None:
    global _WORKER_STORE
    _WORKER_STORE = ReferenceStore(data_dir, max_references, jsonl_splits=jsonl_splits)


def _rmsd_task(args: tuple[str, list[str | None], bool]) -> np.ndarray:
    """``[K, M]`` RMSD of one group in a worker process (molecules travel as MolBlocks)."""
    smiles, blocks, symmetry = args
    assert _WORKER_STORE is not None
    refs = _WORKER_STORE.get(smiles)
    mols = [None if b is None else Chem.MolFromMolBlock(b, removeHs=False) for b in blocks]
    return rmsd_matrix(list(refs), mols, symmetry).T


@dataclass
class GroupGates:
    """Gates (a)-(c) of one group: the references, the molecules that passed them (None otherwise),
    the gate masks ``[K]`` and the PoseBusters counts (checked, cached, errors, seconds)."""

    references: tuple[Chem.Mol, ...]
    mols: list[Chem.Mol | None]
    gates: dict[str, np.ndarray]
    posebusters: tuple[int, int, int, float]


@dataclass
class GroupScore:
    """One group's scores: ``total [K]`` (NaN without references), gate masks ``[K]`` and, for the
    valid completions, the terms and the RMSD matrix ``distances [K, M]``."""

    total: np.ndarray
    gates: dict[str, np.ndarray]
    valid: np.ndarray
    distances: np.ndarray
    terms: dict[str, np.ndarray]
    soft_coverage: np.ndarray
    matched: int
    posebusters: tuple[int, int, int, float]  # checked, cached, errors, seconds


def _unscored(k: int) -> GroupScore:
    """A group whose molecule has no references: NaN totals (the engine's failure penalty)."""
    return GroupScore(np.full(k, np.nan), {g: np.zeros(k, dtype=bool) for g in GATES}, np.zeros(k, dtype=bool),
                      np.full((k, 0), np.inf), {}, np.zeros(0), 0, (0, 0, 0, 0.0))


class ConformerReward:
    """3DMolGen's reward v3 (``reward=molgen/conformer_v3``); channel ``conformer``."""

    def __init__(self, data_dir: str, max_references: int | None = 30, delta: float = 0.75, sigma: float = 0.3,
                 rho: float = 0.07, depth_weight: float = 0.2, precision_weight: float = 0.08,
                 quality_weight: float = 0.0, coverage_weight: float = 5.0, match_weight: float = 0.0,
                 r_floor: float = -1.0, posebusters: str = "geometry", posebusters_energy_threads: int = 1,
                 symmetry: bool = False, credit: str = "shapley", num_workers: int = 0, diversity: bool = False,
                 reference_splits: Sequence[str] = ()) -> None:
        """
        Args:
            data_dir: conformer data folder with the references (``smiles_to_pickle.json``).
            max_references: ``M``, the first this many references of a molecule; None = all.
            delta: coverage threshold (Å) of the smooth coverage and the matching.
            sigma: RMSD scale (Å) of the quality term ``exp(-d_min / sigma)``.
            rho: width (Å) of the soft hit ``sigmoid((delta - D) / rho)``.
            depth_weight: ``w_uq``, extra coverage credit for hits well inside ``delta``.
            precision_weight: ``w_prec``, credit for a completion near any reference.
            quality_weight, coverage_weight, match_weight: ``lambda_qual``, ``lambda_smcov``, ``lambda_match``.
            r_floor: reward of a completion that fails a gate.
            posebusters: gate (c) mode, ``off | basic | geometry | full``.
            posebusters_energy_threads: threads of the energy check (``full``).
            symmetry: RMSD by ``GetBestRMS`` (symmetry-aware, slower) instead of ``AlignMol``.
            credit: ``shapley`` (sums to the soft coverage) or ``leave_one_out`` (3DMolGen's).
            num_workers: processes that compute the RMSD matrices (0 = in this process).
            diversity: also log the median pairwise RMSD between a group's valid completions.
            reference_splits: JSONL splits whose conformers are the references of molecules without
                a pickle (:class:`molgen_grpo.references.ReferenceStore`).
        """
        self.jsonl_splits = tuple(reference_splits)
        self.store = ReferenceStore(data_dir, max_references, jsonl_splits=self.jsonl_splits)
        self.data_dir, self.max_references = str(data_dir), max_references
        self.delta = check_range("delta", delta, 0, low_open=True)
        self.sigma = check_range("sigma", sigma, 0, low_open=True)
        self.rho = check_range("rho", rho, 0, low_open=True)
        self.depth_weight = check_range("depth_weight", depth_weight, 0)
        self.precision_weight = check_range("precision_weight", precision_weight, 0)
        self.weights = {"quality": float(quality_weight), "smooth_coverage": float(coverage_weight),
                        "matching": float(match_weight)}
        if not any(self.weights.values()):
            raise ConfigError("coverage_weight", coverage_weight, "a non-zero weight for at least one term")
        self.r_floor = float(r_floor)
        if credit not in CREDITS:
            raise ConfigError("credit", credit, CREDITS)
        self.credit, self.symmetry, self.diversity = credit, bool(symmetry), bool(diversity)
        self.gate = PoseBustersGate(posebusters, posebusters_energy_threads)
        self.num_workers = check_int("num_workers", num_workers, 0)
        self._pool: ProcessPoolExecutor | None = None

    # ------------------------------------------------------------------ one group

    def check_group(self, smiles: str | None, completions: Sequence[str]) -> GroupGates | None:
        """Gates (a)-(c) of one prompt's completions; None when the molecule has no references."""
        refs = None if smiles is None else self.store.get(smiles)
        if refs is None:
            return None
        with rdBase.BlockLogs():
            decoded = [_decode_and_match(_conformer_block(text), smiles) for text in completions]
        gates = {"decode": np.array([m is not None for m, _ in decoded], dtype=bool),
                 "graph": np.array([g for _, g in decoded], dtype=bool)}
        candidates = np.flatnonzero(gates["decode"] & gates["graph"])
        passed, _, stats = self.gate([decoded[i][0] for i in candidates])
        gates["posebusters"] = np.zeros(len(completions), dtype=bool)
        gates["posebusters"][candidates] = passed
        mols = [mol if ok else None for (mol, _), ok in zip(decoded, gates["posebusters"])]
        return GroupGates(refs, mols, gates, (stats.checked, stats.cached, stats.errors, stats.seconds))

    def finish_group(self, checked: GroupGates, distances: np.ndarray) -> GroupScore:
        """Gate (d) and the terms, from the gates and the ``[K, M]`` RMSD matrix."""
        gates = dict(checked.gates, rmsd=checked.gates["posebusters"] & np.isfinite(distances).any(axis=1))
        valid = gates["rmsd"]
        terms = {"quality": quality(distances, valid, self.sigma)}
        terms["smooth_coverage"], soft = smooth_coverage(distances, valid, self.delta, self.rho, self.depth_weight,
                                                         self.precision_weight, self.credit)
        terms["matching"], pairs = hard_matching(distances, valid, self.delta)
        total = np.where(valid, sum(self.weights[name] * terms[name] for name in terms), self.r_floor)
        return GroupScore(total, gates, valid, distances, terms, soft, len(pairs), checked.posebusters)

    def score_group(self, smiles: str | None, completions: Sequence[str]) -> GroupScore:
        """The scores of one prompt's completions (total NaN when the molecule has no references)."""
        checked = self.check_group(smiles, completions)
        if checked is None:
            return _unscored(len(completions))
        return self.finish_group(checked, rmsd_matrix(list(checked.references), checked.mols, self.symmetry).T)

    # ------------------------------------------------------------------ a rollout

    def __call__(self, rollout: Rollout) -> RewardOutput:
        """Channel ``conformer [B]``; gate failures counted, diagnostics of spec §1.6 item 6 logged."""
        completions, prompts = rollout.info["completions"], rollout.info["prompts"]
        group_ids = rollout.group_ids.cpu().numpy()
        groups = [np.flatnonzero(group_ids == g) for g in dict.fromkeys(group_ids.tolist())]
        smiles = [prompt_smiles(prompts[idx[0]]) for idx in groups]
        start = time.perf_counter()
        checks = [self.check_group(s, [completions[i] for i in idx]) for s, idx in zip(smiles, groups)]
        matrices = self._distances(smiles, checks)
        scores = [_unscored(len(idx)) if c is None else self.finish_group(c, d)
                  for idx, c, d in zip(groups, checks, matrices)]
        total = np.zeros(len(completions))
        for idx, score in zip(groups, scores):
            total[idx] = score.total
        metrics = self._diagnostics(scores, total, groups, completions)
        metrics["time_s"] = time.perf_counter() - start
        return RewardOutput(channels={"conformer": torch.as_tensor(total, dtype=torch.float64)},
                            failures=self._failures(scores), metrics=metrics)

    def _distances(self, smiles: list[str | None], checks: list[GroupGates | None]) -> list[np.ndarray | None]:
        """Each group's ``[K, M]`` RMSD matrix, here or in ``num_workers`` processes."""
        if not self.num_workers:
            return [None if c is None else rmsd_matrix(list(c.references), c.mols, self.symmetry).T for c in checks]
        if self._pool is None:
            self._pool = ProcessPoolExecutor(self.num_workers, initializer=_init_worker,
                                             initargs=(self.data_dir, self.max_references, self.jsonl_splits))
        tasks = [(s, [None if m is None else Chem.MolToMolBlock(m) for m in c.mols], self.symmetry)
                 for s, c in zip(smiles, checks) if c is not None]
        done = iter(self._pool.map(_rmsd_task, tasks))
        return [None if c is None else next(done) for c in checks]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    @staticmethod
    def _failures(scores: list[GroupScore]) -> dict[str, int]:
        """Completions stopped at each gate (the first gate each failed), and those without references."""
        out = {"no_reference": 0, **{gate: 0 for gate in GATES}}
        for score in scores:
            if np.isnan(score.total).all():
                out["no_reference"] += len(score.total)
                continue
            passed_before = np.ones(len(score.total), dtype=bool)
            for gate in GATES:
                out[gate] += int((passed_before & ~score.gates[gate]).sum())
                passed_before &= score.gates[gate]
        return out

    def _diagnostics(self, scores: list[GroupScore], total: np.ndarray, groups: list[np.ndarray],
                     completions: Sequence[str]) -> dict[str, float]:
        """Gate rates, PoseBusters counts, RMSD percentiles, coverage and matching statistics, the
        terms' means and spreads, within-group spread and the terms' agreement with the total."""
        scored = [s for s in scores if not np.isnan(s.total).all()]
        n = sum(len(s.total) for s in scored)
        m: dict[str, float] = {}
        for gate in GATES:
            m[f"gate_{gate}_frac"] = sum(int(s.gates[gate].sum()) for s in scored) / n if n else float("nan")
        valid = sum(int(s.valid.sum()) for s in scored)
        m["valid_frac"] = valid / n if n else float("nan")
        checked, cached, errors, seconds = (sum(s.posebusters[i] for s in scored) for i in range(4))
        m.update(posebusters_checked=checked, posebusters_cached=cached, posebusters_errors=errors,
                 posebusters_s=seconds)
        d_min = np.concatenate([s.distances[s.valid].min(axis=1) for s in scored if s.valid.any()] or [np.zeros(0)])
        for q in (10, 50, 90):
            m[f"rmsd_min_p{q}"] = float(np.percentile(d_min, q)) if d_min.size else float("nan")
        refs = sum(s.distances.shape[1] for s in scored)
        hit = sum(int((s.distances[s.valid] < self.delta).any(axis=0).sum()) for s in scored)
        m["refs_hit_frac"] = hit / refs if refs else float("nan")
        nearest = [s.distances[s.valid].argmin(axis=1) for s in scored if s.valid.any()]
        m["unique_nearest_frac"] = (sum(len(np.unique(a)) for a in nearest) / valid) if valid else float("nan")
        possible = sum(min(int(s.valid.sum()), s.distances.shape[1]) for s in scored)
        m["match_efficiency"] = sum(s.matched for s in scored) / possible if possible else float("nan")
        soft = np.concatenate([s.soft_coverage for s in scored] or [np.zeros(0)])
        m["soft_coverage_mean"] = float(soft.mean()) if soft.size else float("nan")
        for level in (0.1, 0.3, 0.5):
            m[f"soft_coverage_gt_{level}"] = float((soft > level).mean()) if soft.size else float("nan")
        for name in ("quality", "smooth_coverage", "matching"):
            values = np.concatenate([s.terms[name][s.valid] for s in scored] or [np.zeros(0)])
            m[f"{name}_mean"] = float(values.mean()) if values.size else float("nan")
            m[f"{name}_std"] = float(values.std()) if values.size else float("nan")
        spreads = [float(np.nanstd(total[idx])) for idx, s in zip(groups, scores) if not np.isnan(s.total).all()]
        m["group_std_mean"] = float(np.mean(spreads)) if spreads else float("nan")
        smcov = np.concatenate([np.where(s.valid, s.terms["smooth_coverage"], 0.0) for s in scored] or [np.zeros(0)])
        tot = np.concatenate([s.total for s in scored] or [np.zeros(0)])
        varied = smcov.size > 1 and np.ptp(smcov) > 0 and np.ptp(tot) > 0
        m["spearman_smcov_total"] = float(spearmanr(smcov, tot).statistic) if varied else float("nan")
        if self.diversity:
            m["diversity_rmsd_median"] = self._diversity(scored, groups, scores, completions)
        return m

    def _diversity(self, scored: list[GroupScore], groups: list[np.ndarray], scores: list[GroupScore],
                   completions: Sequence[str]) -> float:
        """Median RMSD between pairs of valid completions of the same group."""
        values = []
        for idx, score in zip(groups, scores):
            mols = [decode_conformer(completions[i]) for i, ok in zip(idx, score.valid) if ok]
            for a in range(len(mols)):
                row = rmsd_matrix([mols[a]], mols[a + 1:], self.symmetry) if a + 1 < len(mols) else np.zeros((1, 0))
                values.extend(v for v in row[0] if np.isfinite(v))
        return float(np.median(values)) if values else float("nan")


class LegacyConformerReward:
    """3DMolGen's legacy reward (``reward=molgen/conformer_legacy``), channel ``conformer``:
    ``w_rmsd / (1 + d_min / scale) + w_match * match`` with the weights normalised to sum to 1.

    ``d_min`` is the smallest aligned RMSD to the references (the legacy code took one reference and
    no alignment); a completion without a conformer block or with another graph gets RMSD term 0
    (counted as ``reward/failed_decode`` / ``failed_graph``), and ``match`` compares the block's
    plain SMILES with the prompt's position by position."""

    def __init__(self, data_dir: str, max_references: int | None = 64, rmsd_weight: float = 0.85,
                 match_weight: float = 0.15, rmsd_scale: float = 0.75, symmetry: bool = False,
                 reference_splits: Sequence[str] = ()) -> None:
        """
        Args:
            data_dir: conformer data folder with the references.
            max_references: the first this many references of a molecule; None = all.
            rmsd_weight, match_weight: weights of the two terms (normalised to sum to 1).
            rmsd_scale: the RMSD (Å) at which the RMSD term is 1/2.
            symmetry: RMSD by ``GetBestRMS`` instead of ``AlignMol``.
            reference_splits: JSONL splits whose conformers are the references of molecules without a pickle.
        """
        self.store = ReferenceStore(data_dir, max_references, jsonl_splits=tuple(reference_splits))
        norm = float(rmsd_weight) + float(match_weight)
        if norm <= 0 or rmsd_weight < 0 or match_weight < 0:
            raise ConfigError("rmsd_weight", rmsd_weight, "weights >= 0 with a positive sum")
        self.rmsd_weight, self.match_weight = rmsd_weight / norm, match_weight / norm
        self.rmsd_scale = check_range("rmsd_scale", rmsd_scale, 0, low_open=True)
        self.symmetry = bool(symmetry)

    def __call__(self, rollout: Rollout) -> RewardOutput:
        completions, prompts = rollout.info["completions"], rollout.info["prompts"]
        out = np.zeros(len(completions))
        failures = {"no_reference": 0, "decode": 0, "graph": 0, "rmsd": 0}
        rmsd_terms, matches = [], []
        with rdBase.BlockLogs():
            for i, (prompt, text) in enumerate(zip(prompts, completions)):
                smiles = prompt_smiles(prompt)
                refs = None if smiles is None else self.store.get(smiles)
                if refs is None:
                    out[i] = np.nan
                    failures["no_reference"] += 1
                    continue
                block = _conformer_block(text)
                mol, graph = _decode_and_match(block, smiles)
                try:
                    plain = strip_smiles(block) if block is not None else ""
                except DecodeError:
                    plain = ""
                match = legacy_match_term(plain, smiles) if block is not None else 0.0
                d_min = np.inf
                if mol is None:
                    failures["decode"] += 1
                elif not graph:
                    failures["graph"] += 1
                else:
                    d_min = float(rmsd_matrix(list(refs), [mol], self.symmetry).min())
                    failures["rmsd"] += int(not np.isfinite(d_min))
                rmsd_term = float(legacy_rmsd_term(np.array([d_min]), self.rmsd_scale)[0])
                out[i] = self.rmsd_weight * rmsd_term + self.match_weight * match
                rmsd_terms.append(rmsd_term)
                matches.append(match)
        metrics = {"rmsd_term_mean": float(np.mean(rmsd_terms)) if rmsd_terms else float("nan"),
                   "match_mean": float(np.mean(matches)) if matches else float("nan")}
        return RewardOutput(channels={"conformer": torch.as_tensor(out, dtype=torch.float64)}, failures=failures,
                            metrics=metrics)
