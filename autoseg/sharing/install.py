"""Installing a model archive: checked unpacking into a results root, all or nothing."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from autoseg.log import get_logger
from autoseg.model_folder import ModelFolder, load_checkpoint
from autoseg.sharing.archive import (
    ArchivedFile,
    ArchiveError,
    ArchiveManifest,
    check_members,
    load_manifest,
    open_archive,
)

log = get_logger("sharing")
_CHUNK = 1 << 20


@dataclass(frozen=True)
class InstalledModel:
    """Where an archive's models now live: <results root>/<dataset>/<configuration>__<plans>."""

    results: Path  # the dataset's results folder
    manifest: ArchiveManifest

    def model_folder(self, configuration: str) -> Path:
        return self.results / self.manifest.model(configuration).folder

    @property
    def postprocessing(self) -> Path | None:
        return None if self.manifest.postprocessing is None else self.results.parent / self.manifest.postprocessing


def install_model(archive: Path, results_root: Path, *, overwrite: bool = False) -> InstalledModel:
    """Unpack `archive` into `results_root` (normally AUTOSEG_RESULTS) after checking every entry.

    Everything is unpacked and verified (sizes, sha256, plans, weights_only checkpoints) in a staging
    folder first, then moved into place: a damaged archive leaves the results root untouched. Existing
    model folders are replaced only with `overwrite`.
    """
    archive, results_root = Path(archive), Path(results_root)
    with open_archive(archive) as zipped:
        check_members(archive, zipped)
        manifest = load_manifest(archive, zipped)
        targets = _targets(manifest, results_root)
        taken = [t for t in targets if t.exists()]
        if taken and not overwrite:
            raise ArchiveError(f"already installed: {', '.join(t.name for t in taken)}", path=taken[0].parent,
                               hint="pass --overwrite to replace them, or install into another results folder")
        results_root.mkdir(parents=True, exist_ok=True)
        _check_space(archive, manifest, results_root)
        staging = Path(tempfile.mkdtemp(prefix=".autoseg-install-", dir=results_root))
        try:
            for entry in manifest.files:
                _extract(archive, zipped, entry, staging)
            _verify_models(staging / manifest.dataset, manifest)
            _move_into_place(staging, manifest, targets)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    log.info("installed %s into %s", archive.name, results_root / manifest.dataset)
    return InstalledModel(results_root / manifest.dataset, manifest)


def _targets(manifest: ArchiveManifest, results_root: Path) -> list[Path]:
    dataset = results_root / manifest.dataset
    targets = [dataset / model.folder for model in manifest.models]
    if manifest.postprocessing is not None:
        targets.append(results_root / manifest.postprocessing)
    return targets


def _check_space(archive: Path, manifest: ArchiveManifest, root: Path) -> None:
    needed = sum(f.size for f in manifest.files)
    free = shutil.disk_usage(root).free
    if needed > free:
        raise ArchiveError(f"unpacking needs {needed / 2**30:.1f} GiB, {free / 2**30:.1f} GiB are free", path=root,
                           hint="free disk space, or install into another results folder (--results)")


def _extract(archive: Path, zipped: zipfile.ZipFile, entry: ArchivedFile, staging: Path) -> None:
    """Copy one member, never more bytes than the manifest declares, and check its sha256."""
    target = staging / entry.path
    target.parent.mkdir(parents=True, exist_ok=True)
    digest, written = hashlib.sha256(), 0
    with zipped.open(entry.path) as source, open(target, "wb") as sink:
        while chunk := source.read(min(_CHUNK, entry.size + 1 - written)):
            written += len(chunk)
            if written > entry.size:
                break
            digest.update(chunk)
            sink.write(chunk)
    if written != entry.size or digest.hexdigest() != entry.sha256:
        raise ArchiveError(f"{entry.path} is damaged (size or sha256 differs from the manifest); nothing was "
                           "installed", path=archive, hint="download or export the archive again")


def _verify_models(dataset: Path, manifest: ArchiveManifest) -> None:
    for model in manifest.models:
        folder = ModelFolder(dataset / model.folder)
        folder.load_plans()
        for fold in model.folds:
            load_checkpoint(folder.checkpoint(fold, manifest.checkpoint))


def _move_into_place(staging: Path, manifest: ArchiveManifest, targets: list[Path]) -> None:
    old = staging / ".replaced"
    for target in targets:
        source = staging / manifest.dataset / target.name
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():  # only with overwrite: keep it aside until the new one is in place
            old.mkdir(exist_ok=True)
            os.replace(target, old / target.name)
        os.replace(source, target)
