"""The Python API: one function per command, each taking and returning typed contracts.

The CLI is a thin layer over these; scripts and notebooks call them directly.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autoseg.dataset.contract import Dataset, Problem
from autoseg.errors import DatasetError, PlanError, SettingsError
from autoseg.fingerprint.contract import Fingerprint
from autoseg.log import get_logger, is_main_rank
from autoseg.model_folder import ModelFolder
from autoseg.paths import DatasetLocation, data_root, resolve_dataset
from autoseg.planning.contract import Plans
from autoseg.planning.identifier import (
    DEFAULT_PLANS,
    plan_flags,
    plans_file_name,
    plans_identifier,
    resolve_identifier,
)
from autoseg.serialization import atomic_write, load_contract, save_contract

if TYPE_CHECKING:
    from autoseg.evaluation import EvaluationSummary
    from autoseg.inference import PredictOptions, PredictReport
    from autoseg.planning.networks import NetworkSummary
    from autoseg.sharing import ArchiveManifest, InstalledModel
    from autoseg.sharing.nnunet_import import ImportedModel
    from autoseg.sharing.onnx_export import OnnxExport

log = get_logger("api")

FINGERPRINT_FILE = "fingerprint.json"


def example_dataset(
    out: str | Path, *, n_cases: int = 10, modality: str = "ct", anisotropic: bool = False,
    seed: int = 0, size: int = 48, overwrite: bool = False,
) -> Path:
    """Write the synthetic example dataset (nnU-Net raw layout) to `out` and return its folder."""
    from autoseg.dataset.synthetic import make_example_dataset

    return make_example_dataset(out, n_cases=n_cases, modality=modality, anisotropic=anisotropic,
                                seed=seed, size=size, overwrite=overwrite)


def check(dataset: str | Path, *, workers: int = 1) -> list[Problem]:
    """Every problem of a raw dataset (errors and warnings); an empty list means clean."""
    from autoseg.dataset.check import check_dataset

    return check_dataset(resolve_dataset(dataset).raw, workers=workers)


def load(dataset: str | Path) -> Dataset:
    """Parse a raw dataset (strict: raises DatasetError on structural problems)."""
    from autoseg.dataset.load import load_dataset

    return load_dataset(resolve_dataset(dataset).raw)


def fingerprint(dataset: str | Path, *, workers: int = 1, force: bool = False) -> Fingerprint:
    """The dataset's fingerprint, from cache unless the raw files changed or `force` is set."""
    location = resolve_dataset(dataset)
    return _fingerprint(location, load(location.raw), workers=workers, force=force, spec=dataset)


def _fingerprint(location: DatasetLocation, parsed: Dataset, *, workers: int, force: bool,
                 spec: str | Path) -> Fingerprint:
    from autoseg.fingerprint import dataset_hash, extract_fingerprint

    cache = location.preprocessed / FINGERPRINT_FILE
    if cache.is_file() and not force:
        cached = load_contract(cache, Fingerprint, rerun=f"autoseg fingerprint {spec} --force")
        if cached.source_hash == dataset_hash(parsed):
            log.info("fingerprint is up to date: %s", cache)
            return cached
        log.info("the raw dataset changed since the cached fingerprint: recomputing")
    result = extract_fingerprint(parsed, workers=workers)
    save_contract(cache, result)
    log.info("wrote %s", cache)
    return result


def plan(
    dataset: str | Path, *, memory_budget_gb: float = 8.0, workers: int = 1, force: bool = False,
    network: str = "unet", upsampling: str | None = None,
) -> Plans:
    """Plan every configuration of `network` for `dataset` and write its plans beside the fingerprint:
    plans.json for the default U-Net, plans__IDENTIFIER.json for another family or upsampling."""
    from autoseg.planning import plan as make_plans

    location = resolve_dataset(dataset)
    parsed = load(location.raw)
    fp = _fingerprint(location, parsed, workers=workers, force=force, spec=dataset)
    identifier = plans_identifier(network, upsampling)
    result = make_plans(fp, parsed, memory_budget_gb=memory_budget_gb, network=network, upsampling=upsampling)
    save_contract(plans_path(location, identifier), result)
    atomic_write(location.preprocessed / "dataset.json",
                 lambda tmp: shutil.copyfile(Path(parsed.root) / "dataset.json", tmp))
    log.info("wrote %s", plans_path(location, identifier))
    return result


def networks(dataset: str | Path | None = None, *, memory_budget_gb: float = 8.0, workers: int = 1
             ) -> list[NetworkSummary]:
    """Every network family; with a dataset, each planned for it (parameters, receptive field, memory)."""
    from autoseg.planning.networks import network_summaries

    if dataset is None:
        return network_summaries()
    location = resolve_dataset(dataset)
    parsed = load(location.raw)
    fp = _fingerprint(location, parsed, workers=workers, force=False, spec=dataset)
    return network_summaries(fp, parsed, memory_budget_gb=memory_budget_gb)


def preprocess(
    dataset: str | Path, *, configurations: tuple[str, ...] = ("3d_fullres",), workers: int = 1,
    overwrite: bool = False, plans_name: str | None = None, part: str | None = None,
) -> dict[str, Path]:
    """Preprocess the dataset for the planned configurations (of plans identifier `plans_name`, default
    the default plans); returns configuration -> cache folder, shared by identifiers with equal arrays.

    Needs `plan` first. Finished cases are skipped unless `overwrite`; an interrupted run resumes.
    `part` "I/N": only every N-th case from the I-th (a SLURM array of N tasks covers the dataset once).
    """
    from autoseg.fingerprint import dataset_hash
    from autoseg.preprocessing.run import preprocess_dataset
    from autoseg.runtime.parts import Part

    location = resolve_dataset(dataset)
    plans = load_plans(location.raw, plans_name)
    parsed = load(location.raw)
    if plans.fingerprint_hash != dataset_hash(parsed):
        log.warning("the raw dataset changed since it was planned: consider `autoseg plan %s --force`", dataset)
    return preprocess_dataset(parsed, plans, list(configurations), out_root=location.preprocessed,
                              workers=workers, overwrite=overwrite, part=Part.parse(part))


def train(
    dataset: str | Path, configuration: str, fold: int | str, *, overrides: dict[str, Any] | None = None,
    device: str = "auto", resume: bool = False, validate: bool = True, plans_name: str | None = None,
) -> Path:
    """Train one fold of one configuration of plans identifier `plans_name`; returns the model folder
    (CONFIGURATION__IDENTIFIER).

    `overrides` sets TrainingSettings fields (epochs, initial_lr, ...). With `resume`, the stored
    settings of the run are the base, so `--continue --epochs 2000` extends a finished run. With
    `validate`, the fold's validation cases are then predicted with full sliding windows and
    evaluated (`fold_k/validation/summary.json`).
    """
    from autoseg.training.job import train_one_fold

    location = resolve_dataset(dataset)
    folder = train_one_fold(location, load(location.raw), load_plans(location.raw, plans_name), configuration,
                            fold, overrides=overrides or {}, device=device, resume=resume)
    if validate and is_main_rank():
        if resume and _validation_is_current(ModelFolder(folder), fold):
            log.info("fold %s: validation/summary.json is newer than checkpoint_final.pt, not validating again "
                     "(delete it to redo)", fold)
        else:
            validate_fold(dataset, configuration, fold, device=device, plans_name=plans_name)
    return folder


def _validation_is_current(folder: ModelFolder, fold: int | str) -> bool:
    """A resubmitted finished fold (SLURM arrays resubmit all tasks) need not predict its validation again."""
    summary, final = folder.validation_dir(fold) / "summary.json", folder.checkpoint(fold, "final")
    return summary.is_file() and final.is_file() and summary.stat().st_mtime >= final.stat().st_mtime


def validate_fold(dataset: str | Path, configuration: str, fold: int | str, *, device: str = "auto",
                  save_probabilities: bool = True, plans_name: str | None = None) -> EvaluationSummary | None:
    """Predict a trained fold's validation cases (from the cache) and evaluate them against labelsTr."""
    from autoseg.evaluation import evaluate_folder
    from autoseg.inference.validation import predict_validation
    from autoseg.training.job import fold_run

    location = resolve_dataset(dataset)
    parsed = load(location.raw)
    run = fold_run(location, parsed, load_plans(location.raw, plans_name), configuration, fold)
    if not run.val_ids:
        log.info("fold %s has no validation cases: nothing to validate", fold)
        return None
    output = predict_validation(run.folder, fold, cache=run.cache, case_ids=run.val_ids,
                                file_ending=parsed.file_ending, device=device, save_probabilities=save_probabilities,
                                previous_dir=run.previous_dir)
    return evaluate_folder(output, Path(parsed.root) / "labelsTr", parsed.foreground_labels,
                           file_ending=parsed.file_ending, ignore_label=parsed.ignore_label, cases=run.val_ids)


def model_folder(dataset: str | Path, configuration: str, plans_name: str = DEFAULT_PLANS) -> Path:
    """Where `autoseg train` put (or will put) a configuration's model folder: CONFIGURATION__IDENTIFIER."""
    return _results_folder(dataset) / f"{configuration}__{resolve_identifier(plans_name)}"


def _chosen_model(model: str | Path | None, dataset: str | Path | None, configuration: str, plans_name: str) -> Path:
    """The model folder given by -m, or by -d/-c under AUTOSEG_RESULTS."""
    if model is not None:
        return Path(model)
    if dataset is None:
        raise SettingsError("say which model to use", hint="pass -d DATASET -c CONFIGURATION, or -m MODEL_FOLDER")
    return model_folder(dataset, configuration, plans_name)


def _results_folder(dataset: str | Path) -> Path:
    """The dataset's results folder, also on a machine that has the trained models but not the raw data."""
    try:
        return resolve_dataset(dataset).results
    except DatasetError:
        root, text = data_root("results"), str(dataset)
        pattern = f"Dataset{int(text):03d}_*" if text.isdigit() else text
        matches = sorted(p for p in root.glob(pattern) if p.is_dir()) if root.is_dir() else []
        if len(matches) == 1:
            return matches[0]
        raise


def predict(
    source: str | Path, output: str | Path, *, dataset: str | Path | None = None, configuration: str = "3d_fullres",
    plans_name: str = "autoseg", model: str | Path | None = None, options: PredictOptions | None = None,
    overwrite: bool = False, save_probabilities: bool = False, prev_stage: str | Path | None = None,
    part: str | None = None,
) -> PredictReport:
    """Segment every scan in `source` (a folder of CASE_XXXX files, or one file) into `output`.

    `part` "I/N": only every N-th case from the I-th, so N processes (a SLURM array) share a folder;
    cases already in `output` are skipped, so a last run without `part` only checks completeness.

    The model is `model` (a model folder path) or the `configuration` of `dataset` under AUTOSEG_RESULTS.
    A cascade stage (3d_cascade_fullres) reads the previous stage's predictions from `prev_stage`; without
    it, the previous stage's model folder beside this one predicts them first, into
    OUTPUT/.previous_<stage>/ (with the same options), and a case it could not predict fails here too.
    """
    from autoseg.inference import PredictOptions
    from autoseg.runtime.parts import Part
    from autoseg.sharing.nnunet_import import nnunet_as_autoseg

    share = Part.parse(part)  # a mistyped --part fails before any model is loaded
    given = model
    model = nnunet_as_autoseg(model, configuration=configuration,  # nnU-Net folder or zip: a converted copy
                              checkpoint=(options or PredictOptions()).checkpoint)
    if model is not None and Path(model).suffix.lower() == ".zip" and Path(model).is_file():
        return _predict_with_archive(Path(model), source, output, configuration=configuration, options=options,
                                     overwrite=overwrite, save_probabilities=save_probabilities, prev_stage=prev_stage,
                                     part=part)
    from autoseg.inference import Predictor, predict_folder

    model = _chosen_model(model, dataset, configuration, plans_name)
    predictor = Predictor.from_folder(model, options)
    first_stage = None
    if predictor.previous is not None and prev_stage is None:
        stage = predictor.previous.configuration
        earlier = Path(model).parent / f"{stage}__{predictor.plans.plans_name}"
        if not (earlier / "plans.json").is_file():
            converted = given is not None and Path(given) != Path(model)  # an nnU-Net folder or zip
            first = f"put nnU-Net's {stage} model folder beside it (or in the zip)" if converted else \
                f"train {stage} (every fold)"
            raise SettingsError(f"{predictor.config.name} needs {stage} predictions, and there is no {stage} model "
                                "beside it", path=Path(given) if converted else earlier,
                                hint=f"{first}, or pass --prev-stage DIR with {stage} predictions of these scans")
        prev_stage = Path(output) / f".previous_{stage}"
        log.info("cascade: predicting with %s first, into %s", earlier.name, prev_stage)
        first_stage = predict_folder(Predictor.from_folder(earlier, options), Path(source), prev_stage,
                                     overwrite=overwrite, part=share)
    report = predict_folder(predictor, Path(source), Path(output), overwrite=overwrite,
                            save_probabilities=save_probabilities,
                            previous_stage=None if prev_stage is None else Path(prev_stage), part=share)
    if first_stage is not None:  # the first stage's own reason is the useful one
        report.failed.update({case: f"{stage}: {message}" for case, message in first_stage.failed.items()})
    return report


def _predict_with_archive(archive: Path, source: str | Path, output: str | Path, *, configuration: str,
                          options: PredictOptions | None, **kwargs: Any) -> PredictReport:
    """`predict -m model.zip`: unpack the archive (checked) into a temporary folder and predict from there."""
    import dataclasses

    from autoseg.inference import PredictOptions
    from autoseg.runtime.scratch import scratch_folder
    from autoseg.sharing import install_model, read_manifest

    manifest = read_manifest(archive)
    if len(manifest.models) == 1:
        configuration = manifest.models[0].folder
    options = options or PredictOptions()
    if options.checkpoint != manifest.checkpoint:
        log.info("the archive holds checkpoint_%s.pt: predicting with it", manifest.checkpoint)
        options = dataclasses.replace(options, checkpoint=manifest.checkpoint)
    with scratch_folder("autoseg-model") as unpacked:  # also removes those of killed runs
        installed = install_model(archive, unpacked)
        return predict(source, output, model=installed.model_folder(configuration), options=options, **kwargs)


def import_nnunet(source: str | Path, output: str | Path | None = None, *, checkpoint: str = "final",
                  folds: list[str] | None = None, postprocessing: bool = True, overwrite: bool = False,
                  configuration: str | None = None) -> ImportedModel:
    """Write an nnU-Net v2 model folder or zip as an autoseg model folder in `output` (default: the dataset's
    folder under AUTOSEG_RESULTS); `configuration` picks one model of a zip that holds several."""
    from autoseg.sharing import nnunet_import

    target = Path(output) if output is not None else nnunet_import.default_output(Path(source))
    return nnunet_import.import_nnunet(source, target, checkpoint=checkpoint, folds=folds, configuration=configuration,
                                       postprocessing=postprocessing, overwrite=overwrite)


def export_model(dataset: str | Path, output: str | Path, *, configurations: list[str],
                 folds: list[str] | None = None, checkpoint: str = "final", plans_name: str = "autoseg",
                 ) -> ArchiveManifest:
    """Pack trained models of `dataset` into a zip that `install_model` and `predict(model=zip)` read."""
    from autoseg.sharing import export_model as export

    return export(_results_folder(dataset), Path(output), configurations=configurations, folds=folds,
                  checkpoint=checkpoint, plans_name=resolve_identifier(plans_name))


def install_model(archive: str | Path, *, results: str | Path | None = None, overwrite: bool = False
                  ) -> InstalledModel:
    """Unpack a model archive into `results` (default AUTOSEG_RESULTS), checking every entry first."""
    from autoseg.sharing import install_model as install

    return install(Path(archive), Path(results) if results is not None else data_root("results"),
                   overwrite=overwrite)


def export_onnx(output: str | Path, *, dataset: str | Path | None = None, configuration: str = "3d_fullres",
                model: str | Path | None = None, fold: str = "0", checkpoint: str = "final",
                plans_name: str = "autoseg", opset: int | None = None, check: bool = True) -> OnnxExport:
    """Export one fold's network (of `model`, or of `configuration` of `dataset`) to ONNX plus a JSON sidecar."""
    from autoseg.sharing.onnx_export import export_onnx as export

    model = _chosen_model(model, dataset, configuration, plans_name)
    return export(model, Path(output), fold=fold, checkpoint=checkpoint, opset=opset, check=check)


def plans_path(location: DatasetLocation, plans_name: str | None = None) -> Path:
    """plans.json (default plans) or plans__IDENTIFIER.json in the dataset's preprocessed folder."""
    return location.preprocessed / plans_file_name(resolve_identifier(plans_name))


def load_plans(dataset: str | Path, plans_name: str | None = None) -> Plans:
    """Read the plans `plan` wrote for plans identifier `plans_name` (None: the default plans)."""
    location = resolve_dataset(dataset)
    path = plans_path(location, plans_name)
    if not path.is_file():
        command = f"autoseg plan {dataset} {plan_flags(resolve_identifier(plans_name))}".strip()
        others = sorted(p.name for p in location.preprocessed.glob("plans*.json"))
        raise PlanError("the dataset has not been planned for these plans yet", path=path,
                        hint=f"run `{command}` first" + (f" (planned: {', '.join(others)})" if others else ""))
    return load_contract(path, Plans, rerun=f"autoseg plan {dataset}")


# evaluation, ensembling, postprocessing, find-best and comparison live in their own module
from autoseg.api_evaluation import compare, ensemble, evaluate, find_best, postprocess  # noqa: E402,F401
