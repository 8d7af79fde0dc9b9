"""nnU-Net v2 model folder or zip -> autoseg model folder: `autoseg import-nnunet`, and `predict -m` on them.

    <Trainer>__<Plans>__<configuration>/            nnU-Net (read, never changed)
        plans.json  dataset.json  fold_<k>/checkpoint_{final,best,latest}.pth
        crossval_results_folds_<folds>/postprocessing.json   (optional; its .pkl is never read)
    ->
    <out>/<configuration>__<Trainer>-<Plans>/      autoseg (the layout of autoseg.model_folder)
        plans.json  dataset.json  training.json (where it came from)  fold_<k>/checkpoint_<name>.pt
        postprocessing.json (autoseg's rules, when nnU-Net's postprocessing.json has any)

The folder is written in a staging folder beside its target and renamed into place, so a failed import
leaves nothing. `predict -m NNUNET_FOLDER` converts into a cache folder keyed by the sha256 of the source
files (plans, labels, checkpoints) and predicts from there; an unchanged model converts once. An nnU-Net
model zip (`nnUNetv2_export_model_to_zip`) is unpacked first (`autoseg.sharing.nnunet_zip`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autoseg.dataset.contract import Dataset
from autoseg.dataset.load import read_dataset_json
from autoseg.log import get_logger
from autoseg.model_folder import CHECKPOINT_NAMES, ModelFolder, network_in_channels, save_checkpoint
from autoseg.planning.contract import Plans
from autoseg.serialization import atomic_write, save_contract, write_json
from autoseg.sharing.nnunet_model import NnunetModelError, check_reader, convert_plans, read_json
from autoseg.sharing.nnunet_weights import load_nnunet_checkpoint, mirror_axes, network_state
from autoseg.sharing.nnunet_zip import is_nnunet_zip, unpack_model, zip_dataset, zip_models

log = get_logger("sharing")

_FOLDER_NAME = re.compile(r"(?P<trainer>[^_][^/]*?)__(?P<plans>[^/]+?)__(?P<configuration>[^/_][^/]*)")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
PP_FUNCTION = "remove_all_but_largest_component_from_segmentation"
CONVERTER_VERSION = 2  # part of the cache key: bump when the conversion changes


@dataclass(frozen=True)
class ImportedModel:
    """An nnU-Net model written as an autoseg model folder."""

    folder: Path  # <out>/<configuration>__<Trainer>-<Plans>
    source: Path
    trainer: str
    configuration: str
    checkpoint: str
    folds: tuple[str, ...]
    mirror_axes: tuple[int, ...]
    postprocessing: Path | None
    previous: ImportedModel | None = None  # a cascade stage's previous stage, imported beside it


def is_nnunet_model_folder(path: str | Path) -> bool:  # zips: nnunet_zip.is_nnunet_zip
    """A folder with nnU-Net's plans.json and .pth checkpoints (or named <Trainer>__<Plans>__<configuration>)."""
    path = Path(path)
    if not (path.is_dir() and (path / "plans.json").is_file()):
        return False
    return any(path.glob("fold_*/checkpoint_*.pth")) or (_FOLDER_NAME.fullmatch(path.name) is not None
                                                          and not any(path.glob("fold_*/checkpoint_*.pt")))


def nnunet_folds(root: Path, checkpoint: str) -> tuple[str, ...]:
    """Folds with fold_<k>/checkpoint_<checkpoint>.pth, numbered first, then "all"."""
    found = [p.parent.name.removeprefix("fold_") for p in root.glob(f"fold_*/checkpoint_{checkpoint}.pth")]
    return tuple(sorted(found, key=lambda f: (not f.isdigit(), int(f) if f.isdigit() else 0, f)))


def import_nnunet(source: str | Path, output: str | Path, *, checkpoint: str = "final",
                  folds: Sequence[str] | None = None, postprocessing: bool = True, overwrite: bool = False,
                  configuration: str | None = None) -> ImportedModel:
    """Write the nnU-Net model folder (or model zip) `source` as an autoseg model folder inside `output` (a
    dataset's results folder: the model folder is output/<configuration>__<Trainer>-<Plans>).

    `postprocessing`: convert crossval_results_folds_*/postprocessing.json into autoseg's rules; a folder
    that has only postprocessing.pkl is refused (pickles are never read) unless this is False.
    `configuration`: which model of a zip that holds several.
    A cascade stage (3d_cascade_fullres) brings its previous stage along when nnU-Net's folder of it is
    beside it (<Trainer>__<Plans>__3d_lowres; in a zip, the zip's model of that configuration): both are
    written into `output`, where `autoseg predict` finds the previous stage.
    """
    if is_nnunet_zip(source):
        with tempfile.TemporaryDirectory(prefix="autoseg-nnunet-") as unpacked:
            folder = unpack_model(Path(source), Path(unpacked), configuration)
            sibling = _previous_stage_folder_name(folder)
            if sibling is not None and any(m.endswith(f"/{sibling}") for m in zip_models(Path(source))):
                unpack_model(Path(source), Path(unpacked), sibling)
            return _import_with_previous(folder, Path(output), checkpoint=checkpoint, folds=folds,
                                         postprocessing=postprocessing, overwrite=overwrite, origin=Path(source))
    return _import_with_previous(Path(source), Path(output), checkpoint=checkpoint, folds=folds,
                                 postprocessing=postprocessing, overwrite=overwrite, origin=Path(source))


def _import_with_previous(root: Path, output: Path, *, origin: Path, **options: Any) -> ImportedModel:
    """The model at `root`, and for a cascade stage its previous stage's folder beside it (every fold)."""
    name = _previous_stage_folder_name(root)
    sibling = None if name is None else root.parent / name
    if sibling is not None and not sibling.is_dir():
        log.warning("%s is a cascade stage and there is no %s beside it: import that model too (or give "
                    "`autoseg predict --prev-stage DIR` its predictions)", root.name, sibling.name)
        sibling = None
    imported = _import_folder(root, output, origin=origin, **options)
    if sibling is None:
        return imported
    earlier = _import_folder(sibling, output, origin=origin if origin != root else sibling,
                             **{**options, "folds": None})
    return dataclasses.replace(imported, previous=earlier)


def _previous_stage_folder_name(root: Path) -> str | None:
    """For a cascade model folder, the nnU-Net folder name of its previous stage (same trainer and plans, the
    configuration its plans.json names as `previous_stage`); None for a model that stands alone."""
    from autoseg.sharing.nnunet_model import configuration_entry

    name = _name_part(root, "configuration")
    if not name or not (root / "plans.json").is_file():
        return None
    plans = read_json(root / "plans.json")
    if name not in plans.get("configurations", {}):
        return None
    previous = configuration_entry(plans, name, root / "plans.json").get("previous_stage")
    return f"{_name_part(root, 'trainer')}__{_name_part(root, 'plans')}__{previous}" if previous else None


@dataclass(frozen=True)
class _Source:
    """What an nnU-Net model folder says, read and checked before anything is written."""

    trainer: str
    configuration: str
    plans_name: str  # autoseg's plans identifier: <Trainer>-<Plans>
    plans: Plans
    dataset: Dataset
    folds: tuple[str, ...]
    checkpoint: str
    first: dict[str, Any]  # the first fold's checkpoint (the others are loaded one at a time)
    provenance: dict[str, Any]
    rules: Any  # PostprocessingRules | None


def _import_folder(root: Path, output: Path, *, checkpoint: str, folds: Sequence[str] | None, postprocessing: bool,
                   overwrite: bool, origin: Path) -> ImportedModel:
    source = _read_source(root, checkpoint, folds, postprocessing)
    target = output / f"{source.configuration}__{source.plans_name}"
    if target.exists() and not overwrite:
        raise NnunetModelError("the model folder exists already", path=target,
                               hint="pass --overwrite to replace it, or -o another folder")
    output.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=output))
    try:
        axes = _write_folder(staging, root, source, origin)
        _replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("imported %s (%s, folds %s) into %s", origin.name, source.trainer, " ".join(source.folds), target)
    return ImportedModel(folder=target, source=origin, trainer=source.trainer, configuration=source.configuration,
                         checkpoint=checkpoint, folds=source.folds, mirror_axes=axes,
                         postprocessing=target / "postprocessing.json" if source.rules is not None else None)


def _read_source(root: Path, checkpoint: str, folds: Sequence[str] | None, postprocessing: bool) -> _Source:
    if checkpoint not in CHECKPOINT_NAMES:
        raise NnunetModelError(f"unknown checkpoint {checkpoint!r}", hint=f"use one of {', '.join(CHECKPOINT_NAMES)}")
    if not is_nnunet_model_folder(root):
        raise NnunetModelError("not an nnU-Net v2 model folder (plans.json and fold_*/checkpoint_*.pth)", path=root,
                               hint="point at nnUNet_results/<dataset>/<Trainer>__<Plans>__<configuration>")
    plans_raw = read_json(root / "plans.json")
    check_reader(read_json(root / "dataset.json"), root / "dataset.json")
    dataset = read_dataset_json(root / "dataset.json")
    chosen = _chosen_folds(root, folds, checkpoint)
    first = load_nnunet_checkpoint(_pth(root, chosen[0], checkpoint))
    trainer = str(first.get("trainer_name") or _name_part(root, "trainer"))
    configuration = _configuration(root, first, plans_raw)
    plans_name = _UNSAFE.sub("-", f"{trainer}-{plans_raw.get('plans_name', 'nnUNetPlans')}")
    plans = convert_plans(plans_raw, dataset, configuration, plans_name=plans_name, path=root / "plans.json")
    return _Source(trainer=trainer, configuration=configuration, plans_name=plans_name, plans=plans, dataset=dataset,
                   folds=chosen, checkpoint=checkpoint, first=first,
                   provenance=_provenance(root, trainer, plans_raw, configuration, checkpoint, chosen),
                   rules=_postprocessing_rules(root, dataset, chosen) if postprocessing else None)


def _write_folder(staging: Path, root: Path, source: _Source, origin: Path) -> tuple[int, ...]:
    """plans.json, dataset.json, training.json, the checkpoints (fold by fold) and the rules into `staging`;
    returns the mirror axes (of the last fold; the predictor uses those every fold allows)."""
    folder, plans = ModelFolder(staging), source.plans
    config = plans.configurations[source.configuration]
    in_channels = network_in_channels(plans, config, source.dataset)
    save_contract(folder.plans_file, plans)
    shutil.copyfile(root / "dataset.json", folder.dataset_file)
    axes: tuple[int, ...] = ()
    for fold in source.folds:
        path = _pth(root, fold, source.checkpoint)
        payload = source.first if fold == source.folds[0] else load_nnunet_checkpoint(path)
        state = network_state(payload, config.topology, in_channels, plans.num_classes, path)
        axes = mirror_axes(payload, config.dim, path)
        save_checkpoint(folder.checkpoint(fold, source.checkpoint), {"network": state, "mirror_axes": list(axes)})
    if source.rules is not None:
        from autoseg.inference.postprocess import save_rules

        save_rules(staging / "postprocessing.json", source.rules)
    write_json(folder.settings_file, {**source.provenance, "source": str(origin.resolve())})
    return axes


def nnunet_as_autoseg(model: str | Path | None, *, configuration: str | None = None,
                      checkpoint: str = "final") -> str | Path | None:
    """`model` itself, or for an nnU-Net model folder or zip its converted copy in the cache (`cached_import`)."""
    if model is None or not (is_nnunet_model_folder(model) or is_nnunet_zip(model)):
        return model
    return cached_import(model, checkpoint=checkpoint, configuration=configuration)


def cached_import(source: str | Path, *, checkpoint: str = "final", configuration: str | None = None,
                  cache: Path | None = None) -> Path:
    """The autoseg model folder of the nnU-Net folder (or zip) `source` in the conversion cache, converted on
    first use; keyed by the sha256 of plans.json, dataset.json and every fold's checkpoint_<checkpoint>.pth
    (of the zip itself for a zip), and for a cascade stage of its previous stage's folder too. The cache
    folder's `model` file names the converted folder to predict with (a cascade's holds two)."""
    root = Path(source)
    if is_nnunet_zip(root):
        files = [root]
    else:
        configuration = None  # a folder holds one model (and a cascade's previous stage is its sibling)
        name = _previous_stage_folder_name(root)
        sibling = None if name is None else root.parent / name
        files = _model_files(root, checkpoint)
        files += _model_files(sibling, checkpoint) if sibling is not None and sibling.is_dir() else []
    digest = hashlib.sha256(f"autoseg-nnunet-{CONVERTER_VERSION}-{checkpoint}-{configuration}".encode())
    for path in files:
        digest.update(path.name.encode() + _sha256(path).encode())
    folder = (cache or cache_root()) / digest.hexdigest()[:24]
    marker = folder / "model"
    done = folder / marker.read_text(encoding="utf-8").strip() if marker.is_file() else None
    if done is not None and (done / "training.json").is_file():
        log.info("using the converted nnU-Net model in %s", done)
        return done
    imported = import_nnunet(root, folder, checkpoint=checkpoint, postprocessing=False, overwrite=True,
                             configuration=configuration)
    atomic_write(marker, lambda tmp: tmp.write_text(imported.folder.name, encoding="utf-8"))
    return imported.folder


def _model_files(root: Path, checkpoint: str) -> list[Path]:
    """The files of an nnU-Net model folder a conversion reads: plans, labels, the checkpoints."""
    files = [root / "plans.json", root / "dataset.json"]
    return files + [_pth(root, fold, checkpoint) for fold in _chosen_folds(root, None, checkpoint)]


def default_output(source: Path) -> Path:
    """The dataset's results folder under AUTOSEG_RESULTS, by the dataset_name of the model's plans.json (the
    top folder of a zip)."""
    from autoseg.paths import data_root

    if is_nnunet_zip(source):
        name = zip_dataset(source)
    else:
        name = str(read_json(Path(source) / "plans.json").get("dataset_name") or "")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise NnunetModelError(f"plans.json names no usable dataset ({name!r})", path=Path(source) / "plans.json",
                               hint="pass -o with the folder to write the model folder into")
    return data_root("results") / name


def cache_root() -> Path:
    """Where converted nnU-Net models are kept: $XDG_CACHE_HOME/autoseg/nnunet (default ~/.cache/...)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "autoseg" / "nnunet"


def _chosen_folds(root: Path, folds: Sequence[str] | None, checkpoint: str) -> tuple[str, ...]:
    available = nnunet_folds(root, checkpoint)
    if folds is None:
        if not available:
            kinds = [kind for kind in CHECKPOINT_NAMES if nnunet_folds(root, kind)]
            raise NnunetModelError(f"no fold has a checkpoint_{checkpoint}.pth", path=root,
                                   hint=f"pass --checkpoint {kinds[0]}" if kinds else "train the model first")
        return available
    missing = [str(fold) for fold in folds if str(fold) not in available]
    if missing:
        raise NnunetModelError(f"fold(s) {' '.join(missing)} have no checkpoint_{checkpoint}.pth", path=root,
                               hint=f"folds with it: {' '.join(available) or 'none'}")
    return tuple(dict.fromkeys(str(fold) for fold in folds))


def _pth(root: Path, fold: str, checkpoint: str) -> Path:
    return root / f"fold_{fold}" / f"checkpoint_{checkpoint}.pth"


def _name_part(root: Path, part: str) -> str:
    match = _FOLDER_NAME.fullmatch(root.name)
    return match.group(part) if match else ""


def _configuration(root: Path, payload: dict[str, Any], plans: dict[str, Any]) -> str:
    """The checkpoint's own configuration (what nnU-Net's predictor uses), else the folder name's."""
    init_args = payload.get("init_args")
    name = init_args.get("configuration") if isinstance(init_args, dict) else None
    name = name or _name_part(root, "configuration")
    if not name:
        configurations = list(plans.get("configurations", {}))
        if len(configurations) != 1:
            raise NnunetModelError("cannot tell which configuration this model was trained with", path=root,
                                   hint="keep the folder's nnU-Net name <Trainer>__<Plans>__<configuration>")
        name = configurations[0]
    return str(name)


def _postprocessing_rules(root: Path, dataset: Dataset, folds: tuple[str, ...]) -> Any:
    """autoseg's rules from nnU-Net's crossval_results_folds_<folds>/postprocessing.json (None without one)."""
    from autoseg.inference.postprocess import ComponentRule, PostprocessingRules

    candidates = sorted(root.glob("crossval_results_folds_*"))
    wanted = root / f"crossval_results_folds_{'_'.join(folds)}"
    folder = wanted if wanted in candidates else candidates[0] if len(candidates) == 1 else None
    if folder is None:
        return None
    path = folder / "postprocessing.json"
    if not path.is_file():
        if (folder / "postprocessing.pkl").is_file():
            raise NnunetModelError("postprocessing.pkl is a pickle, which autoseg never loads, and there is no "
                                   "postprocessing.json beside it", path=folder / "postprocessing.pkl",
                                   hint="import without it (--no-postprocessing), or copy nnU-Net's "
                                        "postprocessing.json from the training machine")
        return None
    data = read_json(path)
    functions, kwargs = data.get("postprocessing_fns", []), data.get("postprocessing_kwargs", [])
    if any(f != PP_FUNCTION for f in functions) or len(functions) != len(kwargs):
        raise NnunetModelError(f"postprocessing functions {functions} (autoseg reproduces {PP_FUNCTION})", path=path,
                               hint="import without it (--no-postprocessing)")
    rules = []
    for entry in kwargs:
        values = tuple(sorted(set(_flatten(entry.get("labels_or_regions")))))
        rules.append(ComponentRule(_rule_name(values, dataset), values))
    return PostprocessingRules(keep_largest=tuple(rules), decided_on=f"nnU-Net {folder.name}")


def _flatten(value: Any) -> list[int]:
    if isinstance(value, list | tuple):
        return [v for item in value for v in _flatten(item)]
    return [int(value)]


def _rule_name(values: tuple[int, ...], dataset: Dataset) -> str:
    if values == dataset.foreground_values and len(values) > 1:
        return "all foreground"
    names = [label.name for label in dataset.foreground_labels if set(label.values) <= set(values)]
    return " + ".join(names) or " + ".join(str(v) for v in values)


def _provenance(root: Path, trainer: str, plans: dict[str, Any], configuration: str, checkpoint: str,
                folds: tuple[str, ...]) -> dict[str, Any]:
    """training.json of an imported model: where it came from, with the sha256 of every source file."""
    sources = ["plans.json", "dataset.json"] + [f"fold_{fold}/checkpoint_{checkpoint}.pth" for fold in folds]
    return {"imported_from": "nnU-Net v2", "source": str(root.resolve()), "trainer": trainer,
            "plans": plans.get("plans_name"), "configuration": configuration,
            "sha256": {name: _sha256(root / name) for name in sources}}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as source:
        while chunk := source.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _replace(staging: Path, target: Path) -> None:
    """Move the finished folder into place; an old one (overwrite) is kept aside until the new one is there."""
    old = None
    if target.exists():
        old = staging.parent / f".{target.name}.old-{os.getpid()}"
        os.replace(target, old)
    os.replace(staging, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
