"""Model archives: one zip with everything `autoseg predict` needs, for another lab or machine.

    autoseg-model.json                                 manifest: models, folds, checkpoint, sha256 of every file
    <dataset>/<configuration>__<plans>/plans.json      plus dataset.json (labels) and training.json (settings)
    <dataset>/<configuration>__<plans>/fold_<k>/checkpoint_<name>.pt   network weights only
    <dataset>/postprocessing.json                      find-best's rules, when its choice is in the archive

The layout mirrors AUTOSEG_RESULTS, so installing is unpacking into it. Checkpoints keep the network
weights and the mirror axes, never optimizer state. Unpacking trusts nothing: every name must match the
layout above (no absolute paths, `..`, links or unexpected files), sizes and sha256 must match the
manifest, and checkpoints load with `weights_only=True`.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import autoseg
from autoseg.errors import AutosegError
from autoseg.log import get_logger
from autoseg.model_folder import CHECKPOINT_NAMES, ModelFolder, load_checkpoint
from autoseg.serialization import atomic_write, from_jsonable, to_jsonable

log = get_logger("sharing")

MANIFEST = "autoseg-model.json"
ARCHIVE_FORMAT = 1
RULES_NAME = "postprocessing.json"
#: Checkpoint entries kept in an archive: what inference reads, nothing to resume training with.
KEPT_CHECKPOINT_KEYS = ("network", "mirror_axes", "epoch", "total_epochs")
_MODEL_FILES = ("plans.json", "dataset.json", "training.json")
_PART = r"[A-Za-z0-9][A-Za-z0-9._-]*"
#: Caps checked before anything is unpacked: a manifest or JSON file larger than this is not one autoseg
#: wrote, and a checkpoint (weights barely compress; export stores them) that inflates more than
#: MAX_CHECKPOINT_RATIO times is a zip bomb.
MAX_MANIFEST_BYTES = 8 * 2**20
MAX_JSON_BYTES = 64 * 2**20
MAX_CHECKPOINT_RATIO = 8
_FOLD = re.compile(r"\d+|all")
_ALLOWED = (
    re.compile(rf"{re.escape(MANIFEST)}"),
    re.compile(rf"{_PART}/{_PART}__{_PART}/(plans|dataset|training)\.json"),
    re.compile(rf"{_PART}/{_PART}__{_PART}/fold_(\d+|all)/checkpoint_({'|'.join(CHECKPOINT_NAMES)})\.pt"),
    re.compile(rf"{_PART}/{re.escape(RULES_NAME)}"),
)


class ArchiveError(AutosegError):
    """A model archive cannot be written, is damaged, or contains something it must not."""


@dataclass(frozen=True)
class ArchivedModel:
    """One configuration in the archive: its model folder name and the folds it brings."""

    folder: str  # <configuration>__<plans>
    folds: tuple[str, ...]

    @property
    def configuration(self) -> str:
        return self.folder.rsplit("__", 1)[0]


@dataclass(frozen=True)
class ArchivedFile:
    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class ArchiveManifest:
    """autoseg-model.json: what the archive holds and how to check it."""

    dataset: str
    checkpoint: str
    models: tuple[ArchivedModel, ...]
    postprocessing: str | None  # archive path of the rules, or None
    files: tuple[ArchivedFile, ...]
    autoseg_version: str
    created: str
    format: int = ARCHIVE_FORMAT

    def model(self, configuration: str) -> ArchivedModel:
        """The archived model of `configuration` (a configuration name or a model folder name)."""
        for model in self.models:
            if configuration in (model.folder, model.configuration):
                return model
        names = ", ".join(m.configuration for m in self.models)
        raise ArchiveError(f"the archive has no {configuration!r} model (it has: {names})",
                           hint=f"pass -c with one of: {names}")


def export_model(results: Path, output: Path, *, configurations: Sequence[str], folds: Sequence[str] | None = None,
                 checkpoint: str = "final", plans_name: str = "autoseg") -> ArchiveManifest:
    """Pack the trained `configurations` of one dataset's results folder into the zip `output`.

    `folds`: default every fold that has `checkpoint`. A cascade configuration brings its previous stage
    along. find-best's postprocessing rules are added when its chosen setup is among the exported models.
    """
    results, output = Path(results), Path(output)
    if output.is_dir():
        raise ArchiveError("the output is a folder", path=output, hint="pass a file name such as model.zip")
    models = _select_models(results, configurations, folds, checkpoint, plans_name)
    rules = _postprocessing_rules(results, [m.folder for m in models])
    entries: dict[str, bytes | Path] = {}
    for model in models:
        folder = ModelFolder(results / model.folder)
        for name in _MODEL_FILES:
            if not (folder.root / name).is_file():
                raise ArchiveError(f"the model folder has no {name}", path=folder.root / name,
                                   hint="export a folder written by `autoseg train` (it writes plans, dataset "
                                        "and training settings); copy the missing file from the training machine")
            entries[f"{results.name}/{model.folder}/{name}"] = folder.root / name
        for fold in model.folds:
            data = _stripped_checkpoint(folder.checkpoint(fold, checkpoint))
            entries[f"{results.name}/{model.folder}/fold_{fold}/checkpoint_{checkpoint}.pt"] = data
    if rules is not None:
        entries[f"{results.name}/{RULES_NAME}"] = rules
    manifest = ArchiveManifest(
        dataset=results.name, checkpoint=checkpoint, models=tuple(models),
        postprocessing=f"{results.name}/{RULES_NAME}" if rules is not None else None,
        files=tuple(_describe(name, content) for name, content in entries.items()),
        autoseg_version=autoseg.__version__, created=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    atomic_write(output, lambda tmp: _write_zip(tmp, manifest, entries))
    log.info("wrote %s: %s", output, ", ".join(f"{m.folder} folds {' '.join(m.folds)}" for m in models))
    return manifest


def _select_models(results: Path, configurations: Sequence[str], folds: Sequence[str] | None, checkpoint: str,
                   plans_name: str) -> list[ArchivedModel]:
    if checkpoint not in CHECKPOINT_NAMES:
        raise ArchiveError(f"unknown checkpoint {checkpoint!r}", hint=f"use one of {', '.join(CHECKPOINT_NAMES)}")
    if not configurations:
        raise ArchiveError("no configuration to export", hint="pass -c CONFIGURATION (repeat for several)")
    wanted = list(dict.fromkeys(c if "__" in c else f"{c}__{plans_name}" for c in configurations))
    for name in list(wanted):  # a cascade needs its first stage
        previous = ModelFolder(results / name).load_plans().configurations.get(name.rsplit("__", 1)[0])
        stage = previous.previous_stage if previous is not None else None
        if stage and f"{stage}__{plans_name}" not in wanted:
            log.info("%s is a cascade stage: adding %s to the archive", name, stage)
            wanted.insert(wanted.index(name), f"{stage}__{plans_name}")
    return [ArchivedModel(name, _folds_of(ModelFolder(results / name), folds, checkpoint)) for name in wanted]


def _folds_of(folder: ModelFolder, folds: Sequence[str] | None, checkpoint: str) -> tuple[str, ...]:
    available = folder.folds(checkpoint)
    if folds is None:
        if not available:
            raise ArchiveError(f"no fold has a checkpoint_{checkpoint}.pt", path=folder.root,
                               hint="train the folds first, or pass --checkpoint best/latest")
        return available
    missing = [fold for fold in folds if fold not in available]
    if missing:
        raise ArchiveError(f"fold(s) {' '.join(missing)} have no checkpoint_{checkpoint}.pt", path=folder.root,
                           hint=f"trained folds: {' '.join(sorted(available)) or 'none'}; pass -f with those")
    return tuple(dict.fromkeys(folds))


def _postprocessing_rules(results: Path, folders: list[str]) -> Path | None:
    """find-best's rules file, if its chosen setup is exported (rules of another setup would mislead)."""
    from autoseg.evaluation.find_best import BEST_FILE, load_best

    best_file, rules = results / BEST_FILE, results / RULES_NAME
    if not (best_file.is_file() and rules.is_file()):
        return None
    chosen = load_best(best_file).chosen
    if not set(chosen) <= set(folders):
        log.warning("find-best chose %s, which is not (wholly) in this archive: its postprocessing is left out",
                    " + ".join(chosen))
        return None
    return rules


def _stripped_checkpoint(path: Path) -> bytes:
    """The checkpoint's network weights and mirror axes, serialised again without optimizer state."""
    import torch

    payload = load_checkpoint(path)
    kept = {key: payload[key] for key in KEPT_CHECKPOINT_KEYS if key in payload}
    buffer = io.BytesIO()
    torch.save(kept, buffer)
    return buffer.getvalue()


def _describe(name: str, content: bytes | Path) -> ArchivedFile:
    data = content.read_bytes() if isinstance(content, Path) else content
    return ArchivedFile(name, len(data), hashlib.sha256(data).hexdigest())


def _write_zip(path: Path, manifest: ArchiveManifest, entries: dict[str, bytes | Path]) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        text = json.dumps(to_jsonable(manifest), indent=2) + "\n"
        archive.writestr(_entry(MANIFEST, zipfile.ZIP_DEFLATED), text)
        for name, content in entries.items():
            data = content.read_bytes() if isinstance(content, Path) else content
            method = zipfile.ZIP_STORED if name.endswith(".pt") else zipfile.ZIP_DEFLATED  # weights barely compress
            archive.writestr(_entry(name, method), data)


def _entry(name: str, method: int) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))  # same content, same bytes
    info.compress_type = method
    info.external_attr = 0o644 << 16
    return info


def read_manifest(archive: Path) -> ArchiveManifest:
    """The manifest of a model archive, after checking every member name against the allowed layout."""
    archive = Path(archive)
    with open_archive(archive) as zipped:
        check_members(archive, zipped)
        return load_manifest(archive, zipped)


def open_archive(archive: Path) -> zipfile.ZipFile:
    if not archive.is_file():
        raise ArchiveError("model archive not found", path=archive, hint="check the path of the .zip file")
    try:
        return zipfile.ZipFile(archive)
    except zipfile.BadZipFile as err:
        raise ArchiveError("not a zip file (or a damaged one)", path=archive,
                           hint="download it again; `autoseg export-model` writes these archives") from err


def check_members(archive: Path, zipped: zipfile.ZipFile) -> None:
    names = [info.filename for info in zipped.infolist()]
    if len(names) != len(set(names)):
        raise ArchiveError("the archive lists a file twice", path=archive, hint="re-export the model")
    for info in zipped.infolist():
        kind = (info.external_attr >> 16) & 0o170000
        if kind not in (0, 0o100000) or not any(p.fullmatch(info.filename) for p in _ALLOWED):
            raise ArchiveError(f"unexpected entry {info.filename!r} (only plans, labels, settings, checkpoints and "
                               "postprocessing rules may be in a model archive; nothing was unpacked)", path=archive,
                               hint="use an archive written by `autoseg export-model`")


def load_manifest(archive: Path, zipped: zipfile.ZipFile) -> ArchiveManifest:
    if MANIFEST not in zipped.namelist():
        raise ArchiveError(f"no {MANIFEST} in the archive", path=archive,
                           hint="use an archive written by `autoseg export-model`")
    size = zipped.getinfo(MANIFEST).file_size
    if size > MAX_MANIFEST_BYTES:
        raise ArchiveError(f"the manifest is {size / 2**20:.0f} MiB (at most {MAX_MANIFEST_BYTES // 2**20} MiB); "
                           "nothing was unpacked", path=archive,
                           hint="use an archive written by `autoseg export-model`")
    with zipped.open(MANIFEST) as source:  # reads at most the declared size
        text = source.read(MAX_MANIFEST_BYTES + 1)
    try:
        data = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise ArchiveError(f"{MANIFEST} is not valid JSON ({err})", path=archive,
                           hint="use an archive written by `autoseg export-model`") from err
    if not isinstance(data, dict) or data.get("format") != ARCHIVE_FORMAT:
        raise ArchiveError(f"archive format {data.get('format') if isinstance(data, dict) else None!r}, this autoseg "
                           f"reads format {ARCHIVE_FORMAT}", path=archive, hint="export it again with this version")
    try:
        manifest: ArchiveManifest = from_jsonable(ArchiveManifest, data)
    except (TypeError, ValueError, KeyError, AttributeError) as err:
        raise ArchiveError(f"{MANIFEST} does not describe a model archive ({err})", path=archive,
                           hint="use an archive written by `autoseg export-model`") from err
    _check_manifest_paths(archive, manifest)
    listed = {f.path for f in manifest.files}
    present = set(zipped.namelist()) - {MANIFEST}
    if listed != present or any(not f.path.startswith(f"{manifest.dataset}/") for f in manifest.files):
        raise ArchiveError("the archive's files do not match its manifest", path=archive,
                           hint="the archive was changed after export: export it again")
    _check_sizes(archive, manifest, zipped)
    return manifest


def _check_manifest_paths(archive: Path, manifest: ArchiveManifest) -> None:
    """Every name the manifest gives (dataset, model folders, folds, checkpoint, rules) has the exported form,
    so no path built from it can leave the results root or name another folder; and every model's files are
    listed."""
    problems = []
    if not isinstance(manifest.dataset, str) or not re.fullmatch(_PART, manifest.dataset):
        problems.append(f"dataset {manifest.dataset!r}")
    if manifest.checkpoint not in CHECKPOINT_NAMES:
        problems.append(f"checkpoint {manifest.checkpoint!r}")
    folders = [model.folder for model in manifest.models]
    if not folders or len(set(folders)) != len(folders):
        problems.append("models (none, or one listed twice)")
    for model in manifest.models:
        if not isinstance(model.folder, str) or not re.fullmatch(rf"{_PART}__{_PART}", model.folder):
            problems.append(f"model folder {model.folder!r}")
        if not model.folds or any(not isinstance(f, str) or not _FOLD.fullmatch(f) for f in model.folds):
            problems.append(f"folds {model.folds!r}")
    if manifest.postprocessing not in (None, f"{manifest.dataset}/{RULES_NAME}"):
        problems.append(f"postprocessing {manifest.postprocessing!r}")
    if problems:
        raise ArchiveError(f"the manifest names unexpected paths: {'; '.join(problems)} (nothing was unpacked)",
                           path=archive, hint="use an archive written by `autoseg export-model`")
    listed = {f.path for f in manifest.files}
    needed = {f"{manifest.dataset}/{m.folder}/{name}" for m in manifest.models for name in _MODEL_FILES}
    needed |= {f"{manifest.dataset}/{m.folder}/fold_{fold}/checkpoint_{manifest.checkpoint}.pt"
               for m in manifest.models for fold in m.folds}
    needed |= {manifest.postprocessing} if manifest.postprocessing else set()
    if needed - listed:
        raise ArchiveError(f"the manifest lacks {', '.join(sorted(needed - listed)[:3])}", path=archive,
                           hint="the archive is incomplete: export it again")


def _check_sizes(archive: Path, manifest: ArchiveManifest, zipped: zipfile.ZipFile) -> None:
    """Refuse before unpacking: sizes that differ from the zip's own, oversized JSON, checkpoints that inflate
    like a zip bomb."""
    for entry in manifest.files:
        info = zipped.getinfo(entry.path)
        bomb = entry.path.endswith(".pt") and info.file_size > MAX_CHECKPOINT_RATIO * max(info.compress_size, 1)
        oversized = entry.path.endswith(".json") and info.file_size > MAX_JSON_BYTES
        if entry.size != info.file_size or bomb or oversized:
            why = "inflates too much" if bomb else "is too large" if oversized else \
                f"is damaged: another size than the manifest's {entry.size}"
            raise ArchiveError(f"{entry.path} {why} ({info.file_size} bytes from {info.compress_size}); nothing was "
                               "unpacked", path=archive, hint="download or export the archive again")
