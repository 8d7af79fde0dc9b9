"""nnU-Net model zips (`nnUNetv2_export_model_to_zip`): find the model folders inside, unpack only what is needed.

    <dataset>/<Trainer>__<Plans>__<configuration>/plans.json  dataset.json  dataset_fingerprint.json
    <dataset>/<Trainer>__<Plans>__<configuration>/fold_<k>/checkpoint_final.pth  debug.json  progress.png ...
    <dataset>/<Trainer>__<Plans>__<configuration>/crossval_results_folds_<folds>/postprocessing.{json,pkl}
    <dataset>/ensembles/...  <dataset>/inference_information.json

Only plans.json, dataset.json, checkpoints and postprocessing files of the chosen model are unpacked (the
.pkl only so that a pickle-only postprocessing is reported; it is never read); every other member is
skipped. Names must match the layout above (no absolute paths, `..` or links), and the declared sizes must
fit on the disk before anything is written.
"""

from __future__ import annotations

import re
import shutil
import zipfile
from pathlib import Path

from autoseg.sharing.nnunet_model import NnunetModelError

_NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]*"
_MODEL = rf"{_NAME}/{_NAME}__{_NAME}__{_NAME}"
_KEPT = re.compile(rf"(?P<model>{_MODEL})/(plans\.json|dataset\.json|fold_(\d+|all)/checkpoint_(final|best|latest)"
                   rf"\.pth|crossval_results_folds_[0-9a-z_]+/postprocessing\.(json|pkl))", re.ASCII)
_CHUNK = 1 << 20
#: An autoseg archive has this manifest; an nnU-Net zip never does.
AUTOSEG_MANIFEST = "autoseg-model.json"


def is_nnunet_zip(path: str | Path) -> bool:
    """A zip with at least one <dataset>/<Trainer>__<Plans>__<configuration>/plans.json and no autoseg manifest."""
    path = Path(path)
    if path.suffix.lower() != ".zip" or not path.is_file() or not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zipped:
        names = zipped.namelist()
    return AUTOSEG_MANIFEST not in names and bool(_models(names))


def zip_dataset(path: str | Path) -> str:
    """The dataset folder name of the zip's first model (nnU-Net exports one dataset per zip)."""
    return zip_models(path)[0].split("/", 1)[0]


def zip_models(path: str | Path) -> list[str]:
    """The model folders of the zip (<dataset>/<Trainer>__<Plans>__<configuration>), sorted."""
    with zipfile.ZipFile(path) as zipped:
        return _models(zipped.namelist())


def _models(names: list[str]) -> list[str]:
    return sorted({m.group("model") for name in names if (m := _KEPT.fullmatch(name)) and name.endswith("/plans.json")})


def unpack_model(archive: Path, target: Path, configuration: str | None = None) -> Path:
    """Unpack one model of the nnU-Net zip `archive` into `target`; returns its model folder there.

    `configuration` picks the model when the zip holds several: the folder name's last part, or the whole
    folder name (<Trainer>__<Plans>__<configuration>).
    """
    with zipfile.ZipFile(archive) as zipped:
        models = _models(zipped.namelist())
        chosen = [m for m in models if configuration in (m.rsplit("__", 1)[1], m.rsplit("/", 1)[1])]
        if len(models) == 1:
            chosen = models
        if len(chosen) != 1:
            names = ", ".join(m.rsplit("/", 1)[1] for m in models)
            raise NnunetModelError(f"the zip holds {len(models)} models ({names}); which one?", path=archive,
                                   hint="pass -c with the configuration to use")
        members = [info for info in zipped.infolist() if (m := _KEPT.fullmatch(info.filename))
                   and m.group("model") == chosen[0]]
        for info in members:
            if (info.external_attr >> 16) & 0o170000 not in (0, 0o100000):
                raise NnunetModelError(f"{info.filename} is not a plain file (a link?); nothing was unpacked",
                                       path=archive, hint="use the zip nnUNetv2_export_model_to_zip wrote")
        needed = sum(info.file_size for info in members)
        target.mkdir(parents=True, exist_ok=True)
        if needed > shutil.disk_usage(target).free:
            raise NnunetModelError(f"unpacking needs {needed / 2**30:.1f} GiB, more than is free", path=target,
                                   hint="free disk space (or set TMPDIR / XDG_CACHE_HOME to a larger disk)")
        for info in members:
            _extract(zipped, info, target / info.filename)
    return target / chosen[0]


def _extract(zipped: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path) -> None:
    """Copy one member, never more than its declared size (zipfile also checks the CRC at the end)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with zipped.open(info) as source, open(path, "wb") as sink:
        while chunk := source.read(min(_CHUNK, info.file_size + 1 - written)):
            written += len(chunk)
            if written > info.file_size:
                raise NnunetModelError(f"{info.filename} is larger than the zip declares", path=zipped.filename,
                                       hint="the zip is damaged: export it again")
            sink.write(chunk)
