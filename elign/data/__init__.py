"""Datasets: the QM9 release (reader, EDM split, node-count histogram) and the embedded QM9 sample."""

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
from elign.data.sample import QM9SampleDataset, load_qm9_sample, sample_node_histogram, sample_smiles

__all__ = [
    "ATOM_DECODER",
    "FIGSHARE_URLS",
    "PROPERTY_NAMES",
    "QM9_NUM_MOLECULES",
    "QM9Dataset",
    "QM9Molecule",
    "QM9SampleDataset",
    "collate_qm9",
    "download_qm9",
    "iter_qm9",
    "load_qm9",
    "load_qm9_sample",
    "node_count_histogram",
    "qm9_split_indices",
    "read_exclusion_list",
    "read_qm9_xyz",
    "sample_node_histogram",
    "sample_smiles",
]
