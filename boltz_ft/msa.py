"""A workaround for boltz's ``construct_paired_msa`` dropping MSA deletions (boltz 2.2.x and the 2.13 fork).

Its deletion loop re-slices the already-sliced array (``chain_deletions = chain_deletions[del_start:
del_end]``), so every row after the first of a chain keeps no deletion (or a wrong one): ``has_deletion``,
``deletion_value`` and ``deletion_mean`` lose the signal the MSA module reads. The loop's result is
only handed on to ``prepare_msa_arrays(tokens, pairing, is_paired, deletions, msa)``, which also gets
the MSAs, so :func:`deletion_preserving_pairing` wraps that function and rebuilds ``deletions`` from
the MSAs, the way the loop meant to. The rest of boltz's pairing is kept as is.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

__all__ = ["deletion_map", "deletion_preserving_pairing"]


def deletion_map(msa: dict[int, Any]) -> Any:
    """``{(chain_id, seq_idx, res_idx): deletion count}`` of every row of every chain's MSA (numba dict)."""
    import numba

    deletions = numba.typed.Dict.empty(
        key_type=numba.types.Tuple([numba.types.int64, numba.types.int64, numba.types.int64]),
        value_type=numba.types.int64)
    for chain_id, chain_msa in msa.items():
        for sequence in chain_msa.sequences:
            rows = chain_msa.deletions[sequence["del_start"]:sequence["del_end"]]
            for row in rows:
                deletions[(int(chain_id), int(sequence["seq_idx"]), int(row["res_idx"]))] = int(row["deletion"])
    return deletions


@contextlib.contextmanager
def deletion_preserving_pairing() -> Iterator[None]:
    """Within the block, boltz's v2 featurizer pairs MSAs with every row's deletions."""
    from boltz.data.feature import featurizerv2

    original = featurizerv2.prepare_msa_arrays

    def prepare(tokens: Any, pairing: Any, is_paired: Any, deletions: Any, msa: dict[int, Any]) -> Any:
        return original(tokens, pairing, is_paired, deletion_map(msa), msa)

    featurizerv2.prepare_msa_arrays = prepare
    try:
        yield
    finally:
        featurizerv2.prepare_msa_arrays = original
