"""Raw datasets: dataset.json parsing, case discovery, integrity check, the synthetic example.

Importing this package loads numpy only (no torch, no SimpleITK until a file is read).
"""

from autoseg.dataset.check import check_dataset
from autoseg.dataset.contract import Case, Dataset, LabelDef, Problem
from autoseg.dataset.load import load_dataset, read_dataset_json, scan_dataset
from autoseg.dataset.synthetic import make_example_dataset

__all__ = [
    "Case",
    "Dataset",
    "LabelDef",
    "Problem",
    "check_dataset",
    "load_dataset",
    "make_example_dataset",
    "read_dataset_json",
    "scan_dataset",
]
