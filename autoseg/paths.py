"""Where raw, preprocessed and results data live, and how a DATASET argument is resolved.

Environment variables are the only global settings autoseg reads, and only when a path is
needed: AUTOSEG_RAW / AUTOSEG_PREPROCESSED / AUTOSEG_RESULTS, falling back to nnU-Net's
nnUNet_raw / nnUNet_preprocessed / nnUNet_results, then to ./autoseg_data/{raw,preprocessed,results}.
Explicit arguments always win.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from autoseg.errors import DatasetError
from autoseg.log import get_logger

_VARIABLES = {
    "raw": ("AUTOSEG_RAW", "nnUNet_raw"),
    "preprocessed": ("AUTOSEG_PREPROCESSED", "nnUNet_preprocessed"),
    "results": ("AUTOSEG_RESULTS", "nnUNet_results"),
}
_notified: set[str] = set()


def root_variable(kind: str) -> str | None:
    """The environment variable that sets `kind`'s root folder; None when the default is used."""
    return next((variable for variable in _VARIABLES[kind] if os.environ.get(variable)), None)


def data_root(kind: str) -> Path:
    """The root folder for `kind` ('raw', 'preprocessed' or 'results')."""
    variable = root_variable(kind)
    if variable is not None:
        return Path(os.environ[variable].strip().strip('"').strip("'")).expanduser()
    default = Path.cwd() / "autoseg_data" / kind
    if kind not in _notified:
        _notified.add(kind)
        get_logger("paths").info(
            "%s is not set: using %s", _VARIABLES[kind][0], default
        )
    return default


@dataclass(frozen=True)
class DatasetLocation:
    """A resolved dataset: its raw folder and the folders for its outputs."""

    name: str
    raw: Path

    @property
    def preprocessed(self) -> Path:
        return data_root("preprocessed") / self.name

    @property
    def results(self) -> Path:
        return data_root("results") / self.name


def resolve_dataset(spec: str | Path) -> DatasetLocation:
    """Find a dataset from a numeric id (`4`), a name (`Dataset004_Hippocampus`) or a path."""
    text = str(spec)
    path = Path(text).expanduser()
    if path.is_dir() and ((path / "dataset.json").exists() or os.sep in text or text.startswith(".")):
        return DatasetLocation(name=path.resolve().name, raw=path.resolve())
    raw_root = data_root("raw")
    if re.fullmatch(r"\d{1,3}", text):
        return _by_id(int(text), raw_root)
    candidate = raw_root / text
    if candidate.is_dir():
        return DatasetLocation(name=text, raw=candidate)
    raise DatasetError(
        f"no dataset {text!r}: not a folder, and not found under the raw root {raw_root}",
        path=text,
        hint="pass a dataset folder path, or set AUTOSEG_RAW to the folder that holds DatasetXXX_Name folders",
    )


def _by_id(dataset_id: int, raw_root: Path) -> DatasetLocation:
    prefix = f"Dataset{dataset_id:03d}_"
    matches = sorted(p for p in raw_root.glob(prefix + "*") if p.is_dir()) if raw_root.is_dir() else []
    if len(matches) == 1:
        return DatasetLocation(name=matches[0].name, raw=matches[0])
    if not matches:
        raise DatasetError(
            f"no folder {prefix}* under the raw root",
            path=raw_root,
            hint="check the id, or set AUTOSEG_RAW (or nnUNet_raw) to the folder holding your datasets",
        )
    names = ", ".join(m.name for m in matches)
    raise DatasetError(
        f"dataset id {dataset_id} is ambiguous: {names}",
        path=raw_root,
        hint="pass the full dataset name instead of the id",
    )
