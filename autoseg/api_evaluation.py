"""The evaluation part of the Python API (re-exported by `autoseg.api`): evaluate, ensemble, postprocess,
find-best and the comparison of trained models. Thin layers over `autoseg.evaluation` and `autoseg.inference`,
imported lazily so that importing the API stays cheap."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from autoseg.dataset.contract import LabelDef
from autoseg.dataset.load import load_dataset
from autoseg.errors import SettingsError
from autoseg.paths import resolve_dataset
from autoseg.planning.identifier import resolve_identifier

if TYPE_CHECKING:
    from autoseg.evaluation import BestChoice, EvaluationSummary
    from autoseg.evaluation.compare import Comparison


def evaluate(
    predictions: str | Path, reference: str | Path, *, dataset: str | Path | None = None, distances: bool = False,
    tolerance_mm: float = 1.0, workers: int = 1, output: str | Path | None = None,
) -> EvaluationSummary:
    """Compare a folder of predicted label maps with reference labels (Dice, IoU, optional HD95 / NSD)."""
    from autoseg.evaluation import evaluate_folder
    from autoseg.inference.info import INFO_FILE

    if (Path(reference) / INFO_FILE).is_file() and not (Path(predictions) / INFO_FILE).is_file():
        raise SettingsError("the reference folder holds autoseg predictions (prediction.json) and the prediction "
                            "folder does not: the two folders look swapped", path=reference,
                            hint="autoseg evaluate PREDICTIONS REFERENCE (nnU-Net's evaluate_folder takes the "
                                 "reference first)")
    labels, ignore = _evaluation_labels(Path(predictions), dataset)
    ending = _common_ending(Path(predictions))
    return evaluate_folder(predictions, reference, labels, file_ending=ending, ignore_label=ignore,
                           distances=distances, tolerance_mm=tolerance_mm, workers=workers, output=output)


def ensemble(inputs: list[str | Path], output: str | Path, *, overwrite: bool = False,
             save_probabilities: bool = False, workers: int = 1) -> list[str]:
    """Average the saved probabilities of several prediction folders into one segmentation per case."""
    from autoseg.inference import ensemble_folders

    return ensemble_folders([Path(p) for p in inputs], Path(output), overwrite=overwrite,
                            save_probabilities=save_probabilities, workers=workers)


def postprocess(source: str | Path, output: str | Path, rules: str | Path, *, overwrite: bool = False,
                workers: int = 1) -> list[str]:
    """Apply the postprocessing rules chosen by `find_best` (postprocessing.json) to a prediction folder."""
    from autoseg.inference import load_rules, postprocess_folder

    return postprocess_folder(Path(source), Path(output), load_rules(Path(rules)), file_ending=_common_ending(
        Path(source)), overwrite=overwrite, workers=workers)


def find_best(dataset: str | Path, *, configurations: list[str] | None = None, allow_ensembles: bool = True,
              workers: int = 1, plans_names: list[str] | None = None) -> BestChoice:
    """Choose the best configuration or pair ensemble from the cross-validation, and its postprocessing.

    Candidates: the model folders of every plans identifier (pairs across identifiers included), or
    of `plans_names` only; `configurations` are folder names or configuration names.
    """
    from autoseg.evaluation import find_best as choose

    location = resolve_dataset(dataset)
    parsed = load_dataset(location.raw)
    choice = choose(location.results, location.raw / "labelsTr", parsed.foreground_labels,
                    file_ending=parsed.file_ending, ignore_label=parsed.ignore_label, configurations=configurations,
                    allow_ensembles=allow_ensembles, workers=workers,
                    plans_names=[resolve_identifier(p) for p in plans_names] if plans_names else None)
    compare(dataset)  # the trade-offs of what was compared, beside best.json
    return choice


def compare(dataset: str | Path) -> Comparison:
    """Every trained model folder side by side (Dice, size, speed, memory): comparison.json/.md/.png in results."""
    from autoseg.evaluation.compare import write_comparison

    return write_comparison(resolve_dataset(dataset).results)


def _evaluation_labels(predictions: Path, dataset: str | Path | None) -> tuple[tuple[LabelDef, ...], int | None]:
    """Labels from the dataset when given, else from the prediction folder's prediction.json."""
    if dataset is not None:
        parsed = load_dataset(resolve_dataset(dataset).raw)
        return parsed.foreground_labels, parsed.ignore_label
    from autoseg.inference.info import INFO_FILE, read_prediction_info

    if not (predictions / INFO_FILE).is_file():
        raise SettingsError("the labels to evaluate are unknown", path=predictions,
                            hint="pass -d DATASET (the folder has no prediction.json from `autoseg predict`)")
    info = read_prediction_info(predictions)
    return tuple(label for label in info.labels if label.values != (0,)), None


def _common_ending(folder: Path) -> str:
    from autoseg.io.readers import file_ending

    endings = Counter(file_ending(path) for path in folder.iterdir() if path.is_file() and file_ending(path))
    if not endings:
        raise SettingsError("no image files in the prediction folder", path=folder,
                            hint="point at the folder `autoseg predict` wrote")
    return endings.most_common(1)[0][0]
