"""Overlay PNGs: one picture per case to eyeball labels or predictions against the scan.

For each case, the slice along the first array axis (z for the usual scan) with the most labelled
voxels is drawn: the image in grey, windowed to its 0.5-99.5 percentiles on that slice, each label in
its own colour at half opacity (the colours of progress.png). A case without any label shows its middle
slice. Pictures are in array order (rows y, columns x), not resampled: thick-slice scans look squashed
only if the in-plane spacing differs between y and x.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from autoseg.errors import ImageReadError
from autoseg.io.readers import file_ending, find_case_file, read_images, read_label
from autoseg.log import progress
from autoseg.serialization import atomic_write

#: Opacity of the label colours over the grey image.
ALPHA = 0.5


@dataclass(frozen=True)
class OverlayCase:
    case_id: str
    image: Path
    labels: Path


def busiest_slice(labels: np.ndarray) -> int:
    """Index along axis 0 with the most non-zero voxels (the middle one when there are none)."""
    counts = (labels != 0).reshape(labels.shape[0], -1).sum(axis=1)
    return int(counts.argmax()) if counts.any() else labels.shape[0] // 2


def overlay_rgb(image: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(rows, columns, 3) uint8: a grey slice (rows, columns) with its label slice coloured over it."""
    from autoseg.training.progress import class_colours

    low, high = np.percentile(image, [0.5, 99.5]) if image.size else (0.0, 1.0)
    grey = np.clip((image.astype(np.float32) - low) / max(float(high - low), 1e-6), 0.0, 1.0)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    values = [int(v) for v in np.unique(labels) if v != 0]
    largest = max(values, default=0)
    colours = class_colours(max(largest, 1))
    for value in values:
        mask = labels == value
        rgb[mask] = (1 - ALPHA) * rgb[mask] + ALPHA * np.asarray(colours[value - 1][:3], dtype=np.float32)
    return (rgb * 255 + 0.5).astype(np.uint8)


def pair_overlay_cases(images: Path, labels: Path) -> list[OverlayCase]:
    """Cases with both CASE_0000<ending> in `images` and CASE<ending> (any supported ending) in `labels`."""
    found = []
    for path in sorted(Path(images).iterdir()):
        ending = file_ending(path)
        stem = path.name[: len(path.name) - len(ending)] if ending else ""
        if not stem.endswith("_0000"):
            continue
        case_id = stem[: -len("_0000")]
        label = find_case_file(labels, case_id, ending)
        if label is not None:
            found.append(OverlayCase(case_id, path, label))
    if not found:
        raise ImageReadError("no case has both an image CASE_0000<ending> here and a label CASE<ending> in the "
                             "label folder", path=Path(images), hint=f"check the two folders (labels: {labels})")
    return found


def write_overlays(cases: Iterable[OverlayCase], output: Path) -> list[Path]:
    """One CASE.png per case in `output`; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    cases = list(cases)
    written = []
    for case in progress(cases, total=len(cases), description="overlays"):
        image, geometry = read_images([case.image])
        labels, label_geometry = read_label(case.labels)
        if label_geometry.shape != geometry.shape:
            raise ImageReadError(f"case {case.case_id}: labels {label_geometry.shape}, image {geometry.shape}",
                                 path=case.labels, hint="the label file must belong to this very image")
        volume = image[0]  # (z, y, x), or (y, x) for a 2D image
        if labels.ndim == 3:
            index = busiest_slice(labels)
            picture = overlay_rgb(volume[index], labels[index])
        else:
            picture = overlay_rgb(volume, labels)
        target = output / f"{case.case_id}.png"
        atomic_write(target, lambda tmp, picture=picture: plt.imsave(tmp, picture, format="png"))
        written.append(target)
    return written
