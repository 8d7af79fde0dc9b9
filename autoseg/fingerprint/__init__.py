"""Fingerprint stage: spacings, shapes and foreground intensity statistics of a dataset."""

from autoseg.fingerprint.contract import CaseFingerprint, Fingerprint, IntensityStats
from autoseg.fingerprint.extract import analyse_case, dataset_hash, extract_fingerprint

__all__ = [
    "CaseFingerprint",
    "Fingerprint",
    "IntensityStats",
    "analyse_case",
    "dataset_hash",
    "extract_fingerprint",
]
