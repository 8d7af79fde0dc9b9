"""prediction.json: what a folder of predictions holds, so ensembling and evaluation need no model folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from autoseg.dataset.contract import LabelDef
from autoseg.io.readers import file_ending
from autoseg.serialization import load_contract, save_contract

if TYPE_CHECKING:
    from autoseg.inference.predictor import Predictor

INFO_FILE = "prediction.json"
INFO_FORMAT = 1


@dataclass(frozen=True)
class PredictionInfo:
    """Labels and how channels map to them (region_values: None for softmax models), and the source."""

    labels: tuple[LabelDef, ...]
    region_values: tuple[int, ...] | None
    sources: tuple[str, ...]  # model folders (or prediction folders, for an ensemble)
    folds: tuple[str, ...]
    probabilities: bool
    format: int = INFO_FORMAT

    @classmethod
    def from_predictor(cls, predictor: Predictor, *, probabilities: bool) -> PredictionInfo:
        return cls(labels=predictor.dataset.labels, region_values=predictor.semantics.region_values,
                   sources=(str(predictor.source),), folds=predictor.folds, probabilities=probabilities)


def write_prediction_info(folder: Path, info: PredictionInfo) -> None:
    save_contract(Path(folder) / INFO_FILE, info)


def read_prediction_info(folder: Path) -> PredictionInfo:
    return load_contract(Path(folder) / INFO_FILE, PredictionInfo,
                         rerun="autoseg predict (the prediction folder was written by another version)")


def probabilities_file(target: Path) -> Path:
    """Where the probabilities of the label file `target` go: CASE.npz beside CASE<ending>."""
    ending = file_ending(target)
    return target.with_name(target.name[: len(target.name) - len(ending)] + ".npz")
