"""Class probabilities written to CASE.npz while they are computed, never held for the whole volume.

The streamed export (autoseg.inference.streaming) decides a few output rows at a time; their
probabilities (float16) go at once into a raw scratch file beside the target, one region per class
(classes, rows, y, x of the cropped network-order grid). `finish` then writes the same CASE.npz as
`save_probabilities_file`: a zip entry `probabilities.npy` of (classes, z, y, x) float16 in the input's
array order, filled outside the crop (background certain), compressed, written one class at a time,
renamed into place. Memory: a class of the whole volume at a time, whatever the class count.
"""

from __future__ import annotations

import os
import re
import zipfile
from pathlib import Path

import numpy as np

from autoseg.planning.contract import Plans
from autoseg.preprocessing.contract import CaseProperties
from autoseg.preprocessing.inverse import place_in_original
from autoseg.runtime.scratch import remove_stale
from autoseg.serialization import atomic_write

STORED = np.dtype("<f2")
#: The scratch file's name: .CASE.npz.<pid>.scratch
SCRATCH_PID = re.compile(r"\.(?P<pid>\d+)\.scratch$")


class ProbabilityFile:
    """Probabilities (classes, *shape_after_crop) arriving in row blocks -> `target` (CASE.npz)."""

    def __init__(self, target: Path, properties: CaseProperties, *, plans: Plans, classes: int,
                 background_outside: bool) -> None:
        self.target, self.properties, self.plans = Path(target), properties, plans
        self.classes, self.background_outside = classes, background_outside
        self.shape = tuple(int(n) for n in properties.shape_after_crop)
        self.plane = int(np.prod(self.shape[1:])) * STORED.itemsize
        self.target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(self.target.parent.glob(".*.scratch"), SCRATCH_PID)  # left by killed runs
        self.scratch = self.target.with_name(f".{self.target.name}.{os.getpid()}.scratch")
        self.handle = open(self.scratch, "w+b")
        self.handle.truncate(classes * self.shape[0] * self.plane)
        self.rows_written = 0

    def write_rows(self, start: int, probabilities: np.ndarray) -> None:
        """Rows start..start + n - 1 of every class: probabilities (classes, n, *plane) float32."""
        rows = probabilities.shape[1]
        for index, channel in enumerate(probabilities):
            offset = (index * self.shape[0] + start) * self.plane
            os.pwrite(self.handle.fileno(), np.ascontiguousarray(channel, dtype=STORED).tobytes(), offset)
        self.rows_written = max(self.rows_written, start + rows)

    def finish(self) -> None:
        """Write CASE.npz (atomically) from the scratch file, then delete it."""
        if self.rows_written < self.shape[0]:
            raise ValueError(f"only {self.rows_written} of {self.shape[0]} rows of probabilities were written")
        try:
            atomic_write(self.target, self._write_npz)
        finally:
            self.close()

    def close(self) -> None:
        """Drop the scratch file (also when prediction failed midway)."""
        self.handle.close()
        self.scratch.unlink(missing_ok=True)

    def _write_npz(self, path: Path) -> None:
        first = self._channel(0)
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, allowZip64=True) as archive, \
                archive.open("probabilities.npy", "w", force_zip64=True) as entry:
            np.lib.format.write_array_header_2_0(entry, {"descr": STORED.str, "fortran_order": False,
                                                         "shape": (self.classes, *first.shape)})
            entry.write(first.tobytes())
            del first
            for index in range(1, self.classes):
                entry.write(self._channel(index).tobytes())

    def _channel(self, index: int) -> np.ndarray:
        """Class `index` on the input's grid (z, y, x) float16, C-contiguous."""
        count = int(np.prod(self.shape))
        self.handle.seek(index * count * STORED.itemsize)
        channel = np.fromfile(self.handle, dtype=STORED, count=count)
        if channel.size < count:
            raise OSError(f"the scratch file {self.scratch} ended early")
        fill = 1.0 if index == 0 and self.background_outside else 0.0
        restored = place_in_original(channel.reshape(self.shape), self.properties, plans=self.plans, fill=fill)
        return np.ascontiguousarray(restored, dtype=STORED)


def save_probabilities_file(path: Path, probabilities: np.ndarray) -> None:
    """Class probabilities (c, z, y, x) in the input's array order, float16, compressed, written atomically."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            np.savez_compressed(handle, probabilities=probabilities.astype(np.float16))

    atomic_write(path, write)
