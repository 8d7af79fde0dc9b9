"""Predict a fold's validation cases from the preprocessed cache with full sliding windows.

Called when a fold finishes training (through the API, so training never imports inference). The
cases come from the cache, so they are prepared exactly as in training, and are written back on
their original grid beside the fold: `fold_k/validation/CASE<ending>` plus probabilities for
ensembling. A cascade stage gets each case's previous-stage segmentation from `previous_dir`, where
training stored it on the cache's grid (`<cache>/previous_<stage>/CASE.npy`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from autoseg.errors import SettingsError
from autoseg.inference.info import PredictionInfo, write_prediction_info
from autoseg.inference.predictor import PredictOptions, Predictor
from autoseg.inference.run import write_prediction
from autoseg.log import get_logger, progress
from autoseg.model_folder import ModelFolder
from autoseg.preprocessing.cache import read_case
from autoseg.serialization import write_json

log = get_logger("inference")

#: Written beside the validation predictions: how long they took.
TIMING_FILE = "timing.json"


def predict_validation(
    folder: ModelFolder, fold: int | str, *, cache: Path, case_ids: Sequence[str], file_ending: str,
    device: str = "auto", save_probabilities: bool = True, overwrite: bool = True, previous_dir: Path | None = None,
) -> Path:
    """Write the fold's validation predictions; returns the folder they are in."""
    output = folder.validation_dir(fold)
    predictor = Predictor.from_folder(folder.root, PredictOptions(folds=(str(fold),), device=device))
    write_prediction_info(output, PredictionInfo.from_predictor(predictor, probabilities=save_probabilities))
    seconds, predicted = 0.0, 0
    for case_id in progress(case_ids, description=f"validating fold {fold}"):
        target = output / f"{case_id}{file_ending}"
        if target.exists() and not overwrite:
            continue
        started = time.perf_counter()
        data, _, properties, _ = read_case(cache, case_id, mmap=True)
        previous = None if previous_dir is None else _read_previous(previous_dir, case_id)
        prediction = predictor.predict_preprocessed(np.asarray(data), properties, previous=previous,
                                                    with_probabilities=save_probabilities)
        write_prediction(prediction, target, save_probabilities)
        seconds, predicted = seconds + time.perf_counter() - started, predicted + 1
    if predicted:
        _write_timing(output, seconds, predicted, str(predictor.device))
    log.info("validation predictions of fold %s written to %s", fold, output)
    return output


def _write_timing(output: Path, seconds: float, cases: int, device: str) -> None:
    """timing.json: wall seconds per case of the last validation (read, sliding window with TTA, resampling
    back, writing), on `device`; `autoseg compare` reports it."""
    write_json(output / TIMING_FILE, {"cases": cases, "seconds": round(seconds, 3),
                                      "seconds_per_case": round(seconds / cases, 3), "device": device})


def _read_previous(folder: Path, case_id: str) -> np.ndarray:
    path = Path(folder) / f"{case_id}.npy"
    if not path.is_file():
        raise SettingsError(f"case {case_id} has no previous-stage segmentation", path=path,
                            hint="train the cascade fold with `autoseg train`, which stores them first")
    return np.load(path)
