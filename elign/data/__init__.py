"""Datasets: the QM9 release (reader, EDM split, node-count histogram) as torch data."""

from elign.data.dataset import ATOM_DECODER, QM9Dataset, collate_qm9
from elign.data.qm9 import (
    FIGSHARE_URLS,
    PROPERTY_NAMES,
    QM9_NUM_MOLECULES,
    QM9Molecule,
    download_qm9,
    iter_qm9,
    load_qm9,
    node_count_histogram,
    qm9_split_indices,
    read_exclusion_list,
    read_qm9_xyz,
)

__all__ = [
    "ATOM_DECODER",
    "FIGSHARE_URLS",
    "PROPERTY_NAMES",
    "QM9_NUM_MOLECULES",
    "QM9Dataset",
    "QM9Molecule",
    "collate_qm9",
    "download_qm9",
    "iter_qm9",
    "load_qm9",
    "node_count_histogram",
    "qm9_split_indices",
    "read_exclusion_list",
    "read_qm9_xyz",
]
