"""Predict a folder of scans: find the cases, overlap reading / predicting / writing, never stop at one bad case.

Reading and preprocessing the next case and exporting the previous one run in background threads
(numpy, scipy, SimpleITK and torch release the GIL), so the network is rarely idle. A case that
cannot be read is reported with its file and the fix; the others are still predicted. A cascade stage
reads each case's previous-stage segmentation from the `previous_stage` folder (CASE<ending>).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from autoseg.errors import AutosegError, ImageReadError, SettingsError
from autoseg.inference.info import (
    INFO_FILE,
    PredictionInfo,
    probabilities_file,
    read_prediction_info,
    write_prediction_info,
)
from autoseg.inference.predictor import Prediction, Predictor
from autoseg.inference.probability_file import save_probabilities_file
from autoseg.io.geometry import Geometry
from autoseg.io.readers import SUPPORTED_ENDINGS, file_ending, find_case_file, read_images, read_label, write_label
from autoseg.log import get_logger, progress
from autoseg.runtime.parts import WHOLE, Part

log = get_logger("inference")
CHANNEL_PATTERN = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
#: Exports queued at most; bounds the memory held by predictions waiting to be written.
MAX_PENDING_WRITES = 2
#: What the reader thread hands over per case: images (c, z, y, x), geometry, previous-stage labels or None.
Loaded = tuple[np.ndarray, Geometry, "np.ndarray | None"]


@dataclass(frozen=True)
class InputCase:
    case_id: str
    files: tuple[Path, ...]
    channels: tuple[int, ...]
    ending: str


@dataclass
class PredictReport:
    """What happened to each case of a folder prediction."""

    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


def find_input_cases(source: Path, num_channels: int) -> list[InputCase]:
    """Cases in a folder of CASE_XXXX<ending> files (or one file for a one-channel model)."""
    source = Path(source)
    if source.is_file():
        if num_channels != 1:
            raise ImageReadError(f"a single file was given but the model needs {num_channels} channels", path=source,
                                 hint="pass a folder with CASE_0000, CASE_0001, ... files instead")
        ending = file_ending(source)
        stem = source.name[: len(source.name) - len(ending)]
        match = CHANNEL_PATTERN.match(stem)
        return [InputCase(match["case"] if match else stem, (source,), (0,), ending)]
    if not source.is_dir():
        raise ImageReadError("input folder not found", path=source, hint="check the path given to -i")
    grouped: dict[str, dict[int, Path]] = {}
    endings: dict[str, str] = {}
    for path in sorted(source.iterdir()):
        ending = file_ending(path)
        match = CHANNEL_PATTERN.match(path.name[: len(path.name) - len(ending)]) if ending else None
        if match:
            grouped.setdefault(match["case"], {})[int(match["channel"])] = path
            endings[match["case"]] = ending
    if not grouped:
        raise ImageReadError(f"no CASE_XXXX image files ({', '.join(SUPPORTED_ENDINGS)}) in the input folder",
                             path=source, hint="name the scans like the training images: CASE_0000.nii.gz, ...")
    return [InputCase(case, tuple(files[c] for c in sorted(files)), tuple(sorted(files)), endings[case])
            for case, files in sorted(grouped.items())]


def _check_channels(case: InputCase, num_channels: int) -> None:
    if list(case.channels) != list(range(num_channels)):
        missing = sorted(set(range(num_channels)) - set(case.channels))
        detail = f"missing channel(s) {missing}" if missing else f"channels {list(case.channels)}, expected 0 to " \
                                                                  f"{num_channels - 1}"
        raise ImageReadError(f"case {case.case_id}: {detail}", path=case.files[0].parent,
                             hint=f"give {num_channels} file(s) {case.case_id}_0000{case.ending} ... "
                                  f"{case.case_id}_{num_channels - 1:04d}{case.ending}")


def predict_folder(
    predictor: Predictor, source: Path, output: Path, *, overwrite: bool = False, save_probabilities: bool = False,
    output_ending: str | None = None, previous_stage: Path | None = None, part: Part = WHOLE,
) -> PredictReport:
    """Predict every case of `source` into `output` as CASE<ending>; returns what was written, skipped, failed.

    part: only this share of the cases (autoseg.runtime.parts), for N processes on one folder.

    previous_stage: for a cascade model, the folder of the previous stage's predictions (CASE<ending>); a
    case without one fails with a clear message, the others are still predicted.
    """
    _check_previous_stage(predictor, previous_stage)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    cases = part.select(find_input_cases(Path(source), predictor.num_channels))
    if not part.whole:
        log.info("part %s: %d case(s) of this folder", part, len(cases))
    info = PredictionInfo.from_predictor(predictor, probabilities=save_probabilities)
    if not overwrite:
        _check_same_model(output, info)
    write_prediction_info(output, info)
    report = PredictReport()
    todo = []
    for case in cases:
        target = output / f"{case.case_id}{output_ending or case.ending}"
        if target.exists() and not overwrite and (not save_probabilities or probabilities_file(target).exists()):
            report.skipped.append(case.case_id)
        else:
            todo.append((case, target))
    if report.skipped:
        log.info("%d case(s) already predicted in %s (pass --overwrite to redo them)", len(report.skipped), output)
    if todo:
        predictor.load()  # a checkpoint that cannot be read is one error, not one failure per case
    with ThreadPoolExecutor(1, thread_name_prefix="autoseg-read") as reader, \
            ThreadPoolExecutor(1, thread_name_prefix="autoseg-write") as writer:
        pending: list[tuple[str, Future[None]]] = []
        for (case, target), loaded in progress(_prefetch(reader, todo, predictor, previous_stage), total=len(todo),
                                               description="predicting"):
            try:
                images, geometry, previous = loaded.result()
                prediction = predictor.predict(images, geometry=geometry, previous=previous,
                                               probabilities_file=probabilities_file(target) if save_probabilities
                                               else None)
            except AutosegError as err:
                _fail(report, case.case_id, err)
                continue
            pending.append((case.case_id, writer.submit(write_prediction, prediction, target, save_probabilities)))
            pending = _drain(pending, report, keep=MAX_PENDING_WRITES)
        _drain(pending, report, keep=0)
    return report


def _check_same_model(output: Path, info: PredictionInfo) -> None:
    """SettingsError when `output` holds predictions of another model (other folders, folds or labels):
    skipping its existing files would mix two models' outputs under one prediction.json."""
    if not (output / INFO_FILE).is_file():
        return
    try:
        existing = read_prediction_info(output)
    except AutosegError:
        existing = None
    same = existing is not None and _identity(existing) == _identity(info)
    if not same:
        what = "another model's" if existing is None else \
            f"predictions of {', '.join(existing.sources)} (folds {', '.join(existing.folds)})"
        raise SettingsError(f"the output folder already holds {what}, not of this model "
                            f"({', '.join(info.sources)}, folds {', '.join(info.folds)})", path=output,
                            hint="choose another output folder, or pass --overwrite to predict every case again")


def _identity(info: PredictionInfo) -> tuple[object, ...]:
    """What makes two prediction runs the same model: DATASET/CONFIG__PLANS of each source (not the full path:
    a model archive is unpacked into a new temporary folder each time), folds, labels."""
    names = tuple(f"{Path(source).parent.name}/{Path(source).name}" for source in info.sources)
    return names, info.folds, info.labels, info.region_values


def _prefetch(reader: ThreadPoolExecutor, todo: list[tuple[InputCase, Path]], predictor: Predictor,
              previous_stage: Path | None) -> Iterator[tuple[tuple[InputCase, Path], Future[Loaded]]]:
    """Yield each case with the future of its images, the next one already being read. Only the current
    and the next case are referenced here: a folder of large scans never holds more than two."""
    following = reader.submit(_read, todo[0][0], predictor.num_channels, previous_stage) if todo else None
    for index, item in enumerate(todo):
        current, following = following, None
        if index + 1 < len(todo):
            following = reader.submit(_read, todo[index + 1][0], predictor.num_channels, previous_stage)
        assert current is not None
        yield item, current
        del current


def _read(case: InputCase, num_channels: int, previous_stage: Path | None) -> Loaded:
    """Images and geometry of a case, and its previous-stage label map (z, y, x) when a folder is given."""
    _check_channels(case, num_channels)
    images, geometry = read_images(case.files)
    if previous_stage is None:
        return images, geometry, None
    path = previous_stage_file(previous_stage, case)
    previous, previous_geometry = read_label(path)
    if previous_geometry.shape != geometry.shape:
        raise ImageReadError(f"case {case.case_id}: the previous-stage segmentation has shape "
                             f"{previous_geometry.shape}, the scan {geometry.shape}", path=path,
                             hint="the previous-stage folder must hold predictions of these very scans")
    return images, geometry, previous


def previous_stage_file(folder: Path, case: InputCase) -> Path:
    """The previous stage's prediction of `case`: CASE<ending>, the scan's ending first."""
    path = find_case_file(folder, case.case_id, case.ending)
    if path is None:
        raise ImageReadError(f"case {case.case_id}: no previous-stage segmentation {case.case_id}{case.ending}",
                             path=folder, hint="predict the scans with the previous stage into this folder first "
                                               "(or leave out --prev-stage to have `autoseg predict` chain both "
                                               "stages)")
    return path


def _check_previous_stage(predictor: Predictor, previous_stage: Path | None) -> None:
    previous = predictor.previous
    if previous is None and previous_stage is not None:
        raise SettingsError(f"{predictor.config.name} is not a cascade stage: it takes no previous-stage folder",
                            path=previous_stage, hint="leave out --prev-stage")
    if previous is not None and previous_stage is None:
        raise SettingsError(f"{predictor.config.name} needs the {previous.configuration} predictions of the scans",
                            hint=f"pass --prev-stage DIR with them, or predict through `autoseg predict`, which "
                                 f"runs {previous.configuration} first")
    if previous_stage is not None and not Path(previous_stage).is_dir():
        raise SettingsError("previous-stage folder not found", path=previous_stage,
                            hint="pass the folder the previous stage's `autoseg predict -o` wrote")


def write_prediction(prediction: Prediction, target: Path, save_probabilities: bool) -> None:
    """The label map as `target` (the input's geometry) and, if asked, its probabilities beside it."""
    if save_probabilities and prediction.probabilities is not None:
        save_probabilities_file(probabilities_file(target), prediction.probabilities)
    write_label(prediction.labels, prediction.geometry, target)


def _drain(pending: list[tuple[str, Future[None]]], report: PredictReport, *, keep: int
           ) -> list[tuple[str, Future[None]]]:
    """Wait for the oldest exports until at most `keep` are in flight; record their outcome."""
    while len(pending) > keep:
        case_id, future = pending.pop(0)
        try:
            future.result()
            report.written.append(case_id)
        except (AutosegError, OSError, RuntimeError) as err:
            _fail(report, case_id, err)
    return pending


def _fail(report: PredictReport, case_id: str, err: Exception) -> None:
    report.failed[case_id] = str(err)
    log.error("case %s was not predicted: %s", case_id, err)

