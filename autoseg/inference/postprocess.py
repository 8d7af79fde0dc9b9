"""Connected-component postprocessing: keep only the largest component of chosen label groups.

The rules are decided on cross-validation (autoseg.evaluation.find_best) and stored as
postprocessing.json, so new predictions get exactly the filtering that helped there. As in nnU-Net,
components are found with full connectivity (26 neighbours in 3D: voxels touching at a face, edge or
corner belong together), all components tied for the largest size are kept, and removed voxels
become background (0).
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from autoseg.errors import AutosegError
from autoseg.inference.info import INFO_FILE, read_prediction_info, write_prediction_info
from autoseg.io.readers import read_label, write_label
from autoseg.log import get_logger, progress
from autoseg.serialization import load_contract, save_contract

log = get_logger("inference")
RULES_FILE = "postprocessing.json"
RULES_FORMAT = 1


class PostprocessingError(AutosegError):
    """A folder cannot be postprocessed (missing input, output equal to input)."""


@dataclass(frozen=True)
class ComponentRule:
    """Treat the voxels of `values` as one foreground and keep only its largest connected component."""

    name: str  # "all foreground", or the label (region) name
    values: tuple[int, ...]


@dataclass(frozen=True)
class PostprocessingRules:
    """The largest-component filters to apply, in order (usually "all foreground" first, then labels).

    `decided_on` names the cross-validation folder the rules were chosen on (provenance only).
    """

    keep_largest: tuple[ComponentRule, ...] = ()
    decided_on: str = ""
    format: int = RULES_FORMAT

    def describe(self) -> str:
        """One line for logs and instructions."""
        if not self.keep_largest:
            return "no postprocessing"
        return "keep the largest component of " + ", then ".join(rule.name for rule in self.keep_largest)


def keep_largest_component(labels: np.ndarray, values: Sequence[int]) -> np.ndarray:
    """A copy of `labels` (z, y, x) where the voxels labelled with any of `values`, taken together as one
    foreground, keep only their largest fully connected component; the other components become 0."""
    from scipy import ndimage

    mask = np.isin(labels, tuple(values))
    out = labels.copy()
    if not mask.any():
        return out
    structure = ndimage.generate_binary_structure(mask.ndim, mask.ndim)  # full connectivity
    components, count = ndimage.label(mask, structure=structure)
    if count <= 1:
        return out
    sizes = np.bincount(components.ravel())
    sizes[0] = 0  # background is not a component
    keep = sizes == sizes.max()  # ties: every largest component stays, as in nnU-Net
    out[mask & ~keep[components]] = 0
    return out


def apply_rules(labels: np.ndarray, rules: PostprocessingRules) -> np.ndarray:
    """`labels` (z, y, x) with every rule applied in order (a copy; the input is not modified)."""
    out = labels.copy()
    for rule in rules.keep_largest:
        out = keep_largest_component(out, rule.values)
    return out


def postprocess_folder(
    input: Path, output: Path, rules: PostprocessingRules, *, file_ending: str, overwrite: bool = False,
    workers: int = 1,
) -> list[str]:
    """Apply `rules` to every CASE<file_ending> of `input`, writing CASE<file_ending> (same geometry) to `output`.

    prediction.json is carried over (marked as without probabilities: the npz no longer match the labels).
    Existing outputs are skipped unless `overwrite`. Returns the case ids written, sorted.
    """
    source, output = Path(input), Path(output)
    if not source.is_dir():
        raise PostprocessingError("input folder not found", path=source, hint="check the path given to -i")
    if source.resolve() == output.resolve():
        raise PostprocessingError("the output folder is the input folder", path=output,
                                  hint="write the postprocessed files to a new folder")
    files = sorted(p for p in source.iterdir() if p.name.endswith(file_ending) and not p.name.startswith(".")
                   and p.is_file())
    if not files:
        raise PostprocessingError(f"no files ending in {file_ending!r}", path=source,
                                  hint="check the folder and the file ending (dataset.json `file_ending`)")
    output.mkdir(parents=True, exist_ok=True)
    if (source / INFO_FILE).is_file():
        info = read_prediction_info(source)
        write_prediction_info(output, replace(info, probabilities=False))
    todo = [path for path in files if overwrite or not (output / path.name).exists()]
    if len(todo) < len(files):
        log.info("%d case(s) already postprocessed in %s (pass --overwrite to redo them)", len(files) - len(todo),
                 output)
    with ThreadPoolExecutor(max(1, workers), thread_name_prefix="autoseg-postprocess") as pool:
        futures = [pool.submit(_postprocess_file, path, output / path.name, rules) for path in todo]
        for future in progress(futures, total=len(futures), description="postprocessing"):
            future.result()
    log.info("postprocessed %d case(s) into %s (%s)", len(todo), output, rules.describe())
    return sorted(path.name[: -len(file_ending)] for path in todo)


def _postprocess_file(source: Path, target: Path, rules: PostprocessingRules) -> None:
    labels, geometry = read_label(source)
    write_label(apply_rules(labels, rules), geometry, target)


def save_rules(path: Path, rules: PostprocessingRules) -> None:
    """Write the rules as JSON (atomically), e.g. to <results>/postprocessing.json."""
    save_contract(path, rules)


def load_rules(path: Path) -> PostprocessingRules:
    """Read rules written by `save_rules`; a clear error when the file is missing or of another format."""
    path = Path(path)
    if not path.is_file():
        raise PostprocessingError("postprocessing rules not found", path=path,
                                  hint="run `autoseg find-best DATASET` to create postprocessing.json")
    return load_contract(path, PostprocessingRules, rerun="autoseg find-best DATASET")
