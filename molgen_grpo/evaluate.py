"""Sample conformers for held-out molecules and score them against their reference ensembles (spec §1.7).

The protocol: for every test molecule with ``M`` reference conformers the policy writes
``samples_per_reference × M`` completions (2M by default) for the prompt ``[SMILES]s[/SMILES]``;
each completion is decoded (:func:`molgen_grpo.coverage.decode_conformer`), checked for the molecule's
graph, aligned to every reference (:func:`molgen_grpo.coverage.rmsd_matrix`) and summarised as
COV-R / COV-P / MAT-R / MAT-P (:func:`molgen_grpo.coverage.covmat`). Beside coverage every summary
holds the shares of completions that decode (``parse_rate``), that have the molecule's graph
(``graph_match_rate``) and that pass PoseBusters' intramolecular checks (``posebusters_pass_rate``),
all over *every* completion, so a model that writes fewer valid molecules cannot look better.

Sampling is reproducible per molecule: a molecule is sampled after ``torch.manual_seed`` of
:func:`molecule_seed` (the seed and the SMILES), so a subset or a different order of molecules gives
the same completions for the same molecule.
"""

from __future__ import annotations

import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from rdkit import Chem

from elign.engine.errors import DataFormatError, check_int
from molgen_grpo.conformers import MAPPING_NAME
from molgen_grpo.coverage import THRESHOLDS, aggregate, covmat, decode_conformer, headline, rmsd_matrix
from molgen_grpo.references import ReferenceStore, split_smiles
from molgen_grpo.text import same_graph
from molgen_grpo.tokenizer import resolve_path

__all__ = ["CoverageEvaluator", "HeldoutEvaluator", "PROMPT", "QM9_THRESHOLD", "TestMolecule", "load_test_molecules", "molecule_seed", "posebusters_pass",
           "prompt_text", "sample_completions", "score_molecule", "summarize"]

PROMPT = "[SMILES]{smiles}[/SMILES]"  # what the policy continues; its completion opens with [CONFORMER]
QM9_THRESHOLD = 0.5  # Å, the QM9 convention (GEOM-Drugs uses coverage.HEADLINE_THRESHOLD = 0.75)
POSEBUSTERS_CONFIG = "mol"  # PoseBusters' checks of a lone molecule: sanitisation, geometry, clashes, energy


@dataclass(frozen=True)
class TestMolecule:
    """One held-out molecule: its canonical SMILES, reference conformers (RDKit molecules with one
    conformer each) and the reference pickle they came from (relative to the data folder)."""

    smiles: str
    references: tuple[Chem.Mol, ...]
    source: str


def prompt_text(smiles: str) -> str:
    """The prompt of one molecule (3DMolGen's GRPO prompt)."""
    return PROMPT.format(smiles=smiles)


def load_test_molecules(data_dir: str, split: str = "test", max_molecules: int | None = None) -> list[TestMolecule]:
    """The distinct molecules of ``<data_dir>/<split>.jsonl``, in file order, with their references.

    Args:
        data_dir: a folder in the layout of :func:`molgen_grpo.conformers.write_dataset` (or a
            ``package:`` path, e.g. ``package:molgen_grpo/data/qm9_conformers``).
        split: the JSONL file to read the molecules of.
        max_molecules: the first this many molecules; None = all.
    Raises:
        DataFormatError: a missing file, a bad JSONL line, or a molecule without a mapping entry
            (each names the file and line).
    """
    store = ReferenceStore(data_dir, max_references=None, heavy_atoms_only=False)
    out = []
    for key, line_no in split_smiles(data_dir, split, max_molecules).items():
        refs = store.get(key)
        if refs is None:
            raise DataFormatError(str(store.root / f"{split}.jsonl"), line_no, f"{key} has no entry in {MAPPING_NAME}")
        out.append(TestMolecule(key, refs, store.mapping[key]))
    return out


def molecule_seed(seed: int, smiles: str) -> int:
    """The RNG seed a molecule is sampled with: the CRC-32 of ``"<seed>:<smiles>"``, independent of the
    molecule's position in the list (32 bits, because torch's CPU generator keeps only those)."""
    return zlib.crc32(f"{int(seed)}:{smiles}".encode("utf-8"))


def sample_completions(policy: Any, molecules: Sequence[TestMolecule], samples_per_reference: int = 2,
                       seed: int = 0, on_molecule: Callable[[int], None] | None = None) -> list[list[str]]:
    """``samples_per_reference × M`` completions per molecule from ``policy.rollout``.

    Args:
        policy: a :class:`molgen_grpo.policy.Qwen3Policy` (anything with ``rollout(prompts, k)``).
        molecules: the molecules to prompt with.
        samples_per_reference: completions per reference conformer (the protocol's 2).
        seed: each molecule is sampled after ``torch.manual_seed(molecule_seed(seed, smiles))``.
        on_molecule: called with the molecule's index after it is sampled (progress bars).
    """
    from molgen_grpo.policy import Prompt

    out = []
    for index, mol in enumerate(molecules):
        torch.manual_seed(molecule_seed(seed, mol.smiles))
        rollout = policy.rollout([Prompt(index, prompt_text(mol.smiles))], samples_per_reference * len(mol.references))
        out.append(list(rollout.info["completions"]))
        if on_molecule is not None:
            on_molecule(index)
    return out


def posebusters_pass(mol: Chem.Mol) -> bool:
    """Whether ``mol`` passes every PoseBusters check of a lone molecule (``config="mol"``)."""
    from posebusters import PoseBusters

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        table = PoseBusters(config=POSEBUSTERS_CONFIG).bust([Chem.Mol(mol)], None, None, full_report=False)
    return bool(np.asarray(table.values, dtype=bool).all())


def score_molecule(molecule: TestMolecule, completions: Sequence[str], symmetry: bool = True,
                   posebusters: bool = False, thresholds: np.ndarray = THRESHOLDS) -> dict[str, Any]:
    """Scores of one molecule's completions.

    Returns:
        :func:`molgen_grpo.coverage.covmat` (as lists) plus ``smiles``, ``parsed``,
        ``graph_match``, ``posebusters_pass`` (None when not checked) as counts over the completions,
        and ``nearest``: for each reference, ``[generated index, RMSD]`` of its nearest valid
        completion (``[-1, null]`` when none), which the report draws.
    """
    generated = [decode_conformer(text) for text in completions]
    graph = [g is not None and same_graph(Chem.MolToSmiles(Chem.RemoveHs(g)), molecule.smiles) for g in generated]
    rmsd = rmsd_matrix(list(molecule.references), [g if ok else None for g, ok in zip(generated, graph)], symmetry)
    result = {key: (value.tolist() if isinstance(value, np.ndarray) else value)
              for key, value in covmat(rmsd, thresholds).items()}
    nearest = [[int(row.argmin()), float(row.min())] if np.isfinite(row.min()) else [-1, None] for row in rmsd]
    passes = sum(posebusters_pass(g) for g, ok in zip(generated, graph) if ok) if posebusters else None
    result.update(smiles=molecule.smiles, parsed=sum(g is not None for g in generated), graph_match=sum(graph),
                  posebusters_pass=passes, nearest=nearest)
    return result


def summarize(results: Iterable[dict[str, Any]], thresholds: np.ndarray = THRESHOLDS) -> dict[str, Any]:
    """Aggregate of per-molecule :func:`score_molecule` results.

    Returns:
        ``thresholds`` and the curves of :func:`molgen_grpo.coverage.aggregate` (lists), the MAT
        statistics, ``parse_rate``, ``graph_match_rate`` and ``posebusters_pass_rate`` (shares of all
        completions; the last is None when not checked), ``completions``, and ``at_0.5`` /
        ``at_0.75``: flat headline numbers at the QM9 and GEOM-Drugs thresholds.
    """
    results = list(results)
    arrays = [{**r, "cov_r": np.asarray(r["cov_r"]), "cov_p": np.asarray(r["cov_p"])} for r in results]
    summary = aggregate(arrays)
    total = sum(r["n_gen"] for r in results)
    checked = [r["posebusters_pass"] for r in results]
    out: dict[str, Any] = {"thresholds": np.asarray(thresholds, dtype=float).tolist()}
    out.update({k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in summary.items()})
    out.update(completions=total, parse_rate=sum(r["parsed"] for r in results) / total,
               graph_match_rate=sum(r["graph_match"] for r in results) / total,
               posebusters_pass_rate=None if None in checked else sum(checked) / total)
    for at in (QM9_THRESHOLD, 0.75):
        out[f"at_{at}"] = headline(summary, thresholds, at)
    return out


class HeldoutEvaluator:
    """The trainer's evaluator for pretraining (``evaluator=molgen/heldout``): held-out next-token loss
    over packed rows of one JSONL file, and the shares of unconstrained completions for held-out
    prompts that parse and have the prompt's graph, with their MAT-R.

    Args:
        data_dir: conformer data folder (``package:`` path allowed).
        split: held-out split (its JSONL for the loss, its molecules for the prompts).
        seq_len: tokens per packed row (the pretraining's, so the loss is comparable).
        batch_size: rows per forward.
        max_rows: rows the loss is taken over (the first ones in file order); None = all.
        num_molecules: molecules prompted (the first ones in file order); 0 = loss only.
        samples_per_molecule: completions per prompt.
        seed: sampling seed (the same completions for the same weights at every evaluation).
    """

    def __init__(self, data_dir: str, split: str = "valid", seq_len: int = 512, batch_size: int = 8,
                 max_rows: int | None = None, num_molecules: int = 8, samples_per_molecule: int = 4,
                 seed: int = 1234) -> None:
        self.data_dir, self.split = data_dir, split
        self.seq_len = check_int("seq_len", seq_len, 2)
        self.batch_size = check_int("batch_size", batch_size, 1)
        self.max_rows = check_int("max_rows", max_rows, 1, allow_none=True)
        self.num_molecules = check_int("num_molecules", num_molecules, 0)
        self.samples_per_molecule = check_int("samples_per_molecule", samples_per_molecule, 1)
        self.seed = check_int("seed", seed)
        self.molecules = load_test_molecules(data_dir, split, self.num_molecules) if self.num_molecules else []

    @torch.no_grad()
    def __call__(self, policy: Any) -> dict[str, float]:
        from molgen_grpo.packing import PackedJsonl
        from molgen_grpo.policy import Prompt

        rows = PackedJsonl(str(Path(resolve_path(str(self.data_dir))) / f"{self.split}.jsonl"), policy.tokenizer,
                           self.seq_len, shuffle_buffer=1, infinite=False)
        was_training = policy.module.training
        policy.module.eval()
        try:
            loss_sum, targets, batch = 0.0, 0.0, []
            for index, row in enumerate(rows):
                if self.max_rows is not None and index >= self.max_rows:
                    break
                batch.append(row)
                if len(batch) == self.batch_size:
                    loss_sum, targets = _add_loss(policy, batch, loss_sum, targets)
                    batch = []
            if batch:
                loss_sum, targets = _add_loss(policy, batch, loss_sum, targets)
        finally:
            policy.module.train(was_training)
            rows.close()
        out = {"loss": loss_sum / max(targets, 1.0)}
        if self.molecules:
            state = torch.random.get_rng_state()  # evaluation must not move the training RNG
            try:
                torch.manual_seed(self.seed)
                prompts = [Prompt(i, prompt_text(m.smiles)) for i, m in enumerate(self.molecules)]
                texts = policy.rollout(prompts, self.samples_per_molecule).info["completions"]
            finally:
                torch.random.set_rng_state(state)
            k = self.samples_per_molecule
            scores = [score_molecule(m, texts[i * k:(i + 1) * k]) for i, m in enumerate(self.molecules)]
            total = len(texts)
            mat = [s["mat_r"] for s in scores if np.isfinite(s["mat_r"])]
            out.update(parse_rate=sum(s["parsed"] for s in scores) / total,
                       graph_match_rate=sum(s["graph_match"] for s in scores) / total,
                       mat_r_mean=float(np.mean(mat)) if mat else float("nan"))
        return out


def _add_loss(policy: Any, rows: list[dict[str, torch.Tensor]], loss_sum: float, targets: float) -> tuple[float, float]:
    """Token-weighted running sum of the supervised loss over one batch of packed rows."""
    batch = {key: torch.stack([row[key] for row in rows]) for key in rows[0]}
    loss, info = policy.supervised_loss(batch)
    return loss_sum + float(loss) * info["target_tokens"], targets + info["target_tokens"]


class CoverageEvaluator:
    """The trainer's evaluator for GRPO (``evaluator=molgen/coverage``): the protocol of §1.7 on the
    first held-out molecules, with the same sampling seed at every evaluation, so the curves of one run
    compare. Logs COV-R / COV-P (mean) at 0.5 and 0.75 Å, MAT-R / MAT-P (mean), the parse and
    graph-match rates and the molecules without a valid completion.

    Args:
        data_dir: conformer data folder (``package:`` path allowed).
        split: held-out split whose first molecules are prompted.
        num_molecules: molecules scored.
        samples_per_reference: completions per reference conformer (the protocol's 2).
        symmetry: RMSD by ``GetBestRMS`` (the evaluation default) or ``AlignMol``.
        seed: sampling seed (per molecule, :func:`molecule_seed`).
    """

    def __init__(self, data_dir: str, split: str = "valid", num_molecules: int = 8, samples_per_reference: int = 2,
                 symmetry: bool = True, seed: int = 1234) -> None:
        self.molecules = load_test_molecules(data_dir, split, check_int("num_molecules", num_molecules, 1))
        self.samples_per_reference = check_int("samples_per_reference", samples_per_reference, 1)
        self.symmetry, self.seed = bool(symmetry), check_int("seed", seed)

    def __call__(self, policy: Any) -> dict[str, float]:
        with torch.no_grad():
            completions = sample_completions(policy, self.molecules, self.samples_per_reference, self.seed)
        summary = summarize(score_molecule(m, c, self.symmetry) for m, c in zip(self.molecules, completions))
        out = {"parse_rate": summary["parse_rate"], "graph_match_rate": summary["graph_match_rate"],
               "mat_r_mean": summary["at_0.5"]["mat_r_mean"], "mat_p_mean": summary["at_0.5"]["mat_p_mean"],
               "molecules_without_valid": summary["at_0.5"]["molecules_without_valid"]}
        for at in ("0.5", "0.75"):
            out[f"cov_r_{at}"] = summary[f"at_{at}"]["cov_r_mean"]
            out[f"cov_p_{at}"] = summary[f"at_{at}"]["cov_p_mean"]
        return out
