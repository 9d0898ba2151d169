"""PoseBusters as a reward gate (spec §1.6 2c), in modes ``off | basic | geometry | full``.

The checks come from the ``posebusters`` package's own ``mol`` configuration (a lone molecule),
cut to the mode's modules:

- ``basic``: loading, RDKit sanitisation, InChI conversion, all atoms connected;
- ``geometry``: ``basic`` plus distance geometry (bond lengths, angles, internal clashes);
- ``full``: ``geometry`` plus aromatic-ring flatness, non-aromatic-ring non-flatness, double-bond
  flatness and the energy ratio (threshold 100 over a 50-conformer ensemble).

``mol.yml`` lists its energy-ratio module twice, once without outputs, which doubles the most expensive
check; the gate keeps only modules that report a pass/fail column. The energy ensemble embeds with
``energy_threads`` threads (PoseBusters' default, 0, takes every core; the gate runs beside training).
Results are cached per molecule (its MolBlock: the same coordinates give the same verdict), so a
rollout repeated within or across groups is checked once. A PoseBusters exception fails the rollout
and is counted as an error, never a pass.
"""

from __future__ import annotations

import copy
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Sequence

import numpy as np
import yaml
from rdkit import Chem

from elign.engine.errors import ConfigError, check_int

MODES = ("off", "basic", "geometry", "full")
MODE_FUNCTIONS = {
    "basic": ("loading", "rdkit_sanity", "inchi_convertible", "atoms_connected"),
    "geometry": ("loading", "rdkit_sanity", "inchi_convertible", "atoms_connected", "distance_geometry"),
    "full": ("loading", "rdkit_sanity", "inchi_convertible", "atoms_connected", "distance_geometry", "flatness",
             "energy_ratio"),
}


def gate_config(mode: str, energy_threads: int = 1) -> dict[str, Any]:
    """PoseBusters' ``mol`` configuration cut to ``mode``'s modules (see the module docstring)."""
    if mode not in MODE_FUNCTIONS:
        raise ConfigError("posebusters", mode, MODES)
    text = resources.files("posebusters").joinpath("config", "mol.yml").read_text(encoding="utf-8")
    config = yaml.safe_load(text)
    wanted = MODE_FUNCTIONS[mode]
    modules = []
    for module in config["modules"]:
        if module["function"] not in wanted or not module.get("chosen_binary_test_output"):
            continue
        module = copy.deepcopy(module)
        if module["function"] == "energy_ratio":
            module.setdefault("parameters", {})["num_threads"] = int(energy_threads)
        modules.append(module)
    return {"modules": modules, "loading": config["loading"]}


@dataclass
class GateStats:
    """Counts of one call: molecules checked (cache misses), cache hits, passes, errors, seconds."""

    checked: int = 0
    cached: int = 0
    passed: int = 0
    errors: int = 0
    seconds: float = 0.0
    error_messages: list[str] = field(default_factory=list)


class PoseBustersGate:
    """Pass/fail of molecules under a PoseBusters mode, cached per molecule."""

    def __init__(self, mode: str = "geometry", energy_threads: int = 1, cache_size: int = 4096) -> None:
        """
        Args:
            mode: ``off`` (every molecule passes, PoseBusters is never run), ``basic``, ``geometry`` or ``full``.
            energy_threads: threads of the energy-ratio ensemble embedding (``full`` only).
            cache_size: molecules whose verdict is remembered (least recently used dropped).
        """
        if mode not in MODES:
            raise ConfigError("posebusters", mode, MODES)
        self.mode = mode
        self.energy_threads = check_int("posebusters_energy_threads", energy_threads, 1)
        self.cache_size = check_int("posebusters_cache_size", cache_size, 0)
        self._cache: OrderedDict[str, bool] = OrderedDict()
        self._runner: Any = None

    def _buster(self) -> Any:
        if self._runner is None:
            from posebusters import PoseBusters

            self._runner = PoseBusters(config=gate_config(self.mode, self.energy_threads), max_workers=0)
        return self._runner

    def __call__(self, mols: Sequence[Chem.Mol]) -> tuple[np.ndarray, np.ndarray, GateStats]:
        """``passed [N]`` and ``error [N]`` (bool) for each molecule, and the call's counts."""
        n = len(mols)
        passed, error = np.ones(n, dtype=bool), np.zeros(n, dtype=bool)
        stats = GateStats()
        if self.mode == "off" or n == 0:
            return passed, error, stats
        keys = [Chem.MolToMolBlock(m) for m in mols]
        todo = []
        for index, key in enumerate(keys):
            if key in self._cache:
                self._cache.move_to_end(key)
                passed[index] = self._cache[key]
                stats.cached += 1
            else:
                todo.append(index)
        unique = list(dict.fromkeys(keys[i] for i in todo))
        verdicts: dict[str, tuple[bool, bool]] = {}
        start = time.perf_counter()
        for key in unique:  # one molecule per call: one bad molecule cannot fail its neighbours
            verdicts[key] = self._check(Chem.MolFromMolBlock(key, sanitize=False, removeHs=False), stats)
        stats.seconds = time.perf_counter() - start
        stats.checked = len(unique)
        for index in todo:
            passed[index], error[index] = verdicts[keys[index]]
        for key, (ok, failed) in verdicts.items():
            if not failed and self.cache_size:  # an error may be transient (e.g. memory): not cached
                self._cache[key] = ok
                if len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        stats.passed = int(passed.sum())
        return passed, error, stats

    def _check(self, mol: Chem.Mol | None, stats: GateStats) -> tuple[bool, bool]:
        """(passed, error) of one molecule."""
        if mol is None:
            stats.errors += 1
            stats.error_messages.append("the molecule does not round-trip through a MolBlock")
            return False, True
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                table = self._buster().bust([mol], None, None, full_report=False)
            values = table.select_dtypes(include=["bool"]).to_numpy()
            if values.size == 0 or values.shape[1] != table.shape[1]:  # a check that produced no verdict
                return False, False
            return bool(values.all()), False
        except Exception as exc:  # PoseBusters raises many types; any of them fails the rollout, counted
            stats.errors += 1
            stats.error_messages.append(f"{type(exc).__name__}: {exc}")
            return False, True
