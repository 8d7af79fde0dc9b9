"""Cross-validation splits: nnU-Net-compatible 5-fold splits, saved as JSON and honoured if present.

The split of sorted case ids with a shuffled 5-fold (seed 12345) is the same as nnU-Net's, so
cross-validation results of the two tools are directly comparable. A user-provided
`splits_final.json` (nnU-Net's name) or autoseg's own `splits.json` always wins.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from autoseg.errors import SettingsError
from autoseg.log import get_logger
from autoseg.serialization import read_json, write_json

SPLITS_FILE = "splits.json"
NNUNET_SPLITS_FILE = "splits_final.json"
N_FOLDS, SEED = 5, 12345

Split = dict[str, list[str]]
log = get_logger("training")


def make_splits(case_ids: Sequence[str], *, n_folds: int = N_FOLDS, seed: int = SEED) -> list[Split]:
    """Shuffled k-fold over sorted ids; fold sizes differ by at most one (the first ones larger)."""
    ids = sorted(case_ids)
    if len(ids) < n_folds:
        raise SettingsError(f"{len(ids)} cases cannot be split into {n_folds} folds",
                            hint="train with fold 'all', or add cases")
    order = np.arange(len(ids))
    np.random.RandomState(seed).shuffle(order)
    sizes = [len(ids) // n_folds + (1 if f < len(ids) % n_folds else 0) for f in range(n_folds)]
    splits, start = [], 0
    for size in sizes:
        held_out = set(order[start:start + size].tolist())
        start += size
        splits.append({"train": [ids[i] for i in range(len(ids)) if i not in held_out],
                       "val": [ids[i] for i in range(len(ids)) if i in held_out]})
    return splits


def load_or_create_splits(folder: Path, case_ids: Sequence[str], *, extra: Sequence[Path] = ()) -> list[Split]:
    """Splits from `folder`/splits.json, else from a splits_final.json in `folder` or `extra`
    folders (nnU-Net's), else new ones written to `folder`/splits.json."""
    candidates = [folder / SPLITS_FILE, folder / NNUNET_SPLITS_FILE, *(p / NNUNET_SPLITS_FILE for p in extra)]
    for path in candidates:
        if path.is_file():
            splits = _validated(read_json(path), path, set(case_ids))
            if path != folder / SPLITS_FILE:
                write_json(folder / SPLITS_FILE, splits)
            return splits
    n_folds = min(N_FOLDS, len(case_ids))
    if n_folds < N_FOLDS:
        log.warning("only %d cases: making %d folds instead of %d", len(case_ids), n_folds, N_FOLDS)
    splits = make_splits(case_ids, n_folds=max(n_folds, 2))
    write_json(folder / SPLITS_FILE, splits)
    return splits


def fold_cases(splits: list[Split], fold: int | str, case_ids: Sequence[str]) -> tuple[list[str], list[str]]:
    """(training ids, validation ids) of `fold`; fold "all" trains on everything, validates on nothing."""
    if fold == "all":
        return sorted(case_ids), []
    index = int(fold)
    if not 0 <= index < len(splits):
        raise SettingsError(f"fold {fold} does not exist", hint=f"use 0..{len(splits) - 1} or all")
    return list(splits[index]["train"]), list(splits[index]["val"])


def _validated(data: object, path: Path, known: set[str]) -> list[Split]:
    if not isinstance(data, list) or not all(isinstance(s, dict) and {"train", "val"} <= set(s) for s in data):
        raise SettingsError("splits file is not a list of {\"train\": [...], \"val\": [...]}", path=path,
                            hint="fix or delete it to have autoseg create new splits")
    for fold, split in enumerate(data):
        unknown = sorted((set(split["train"]) | set(split["val"])) - known)
        if unknown:
            raise SettingsError(f"fold {fold} names cases that are not in the dataset: {unknown[:5]}",
                                path=path, hint="fix or delete the splits file")
    return [{"train": list(s["train"]), "val": list(s["val"])} for s in data]
