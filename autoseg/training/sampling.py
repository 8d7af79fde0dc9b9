"""Where training patches come from: case choice, patch boxes, foreground oversampling, padded reads.

Every array here is in the cache's axis order: data (c, z, y, x) float32, segmentation (z, y, x)
with -1 outside the body. A 3d configuration samples boxes over (z, y, x); a 2d configuration first
picks a slice along axis 0 and then a box over (y, x). Boxes are voxel index ranges, lower corner
inclusive, and may reach outside the case: those voxels read as 0 (data) and -1 (segmentation).

Only the box is read from the memory-mapped case files, never the whole case, so a worker's memory
is a few patches whatever the size of the scans.
"""

from __future__ import annotations

import itertools
import math
import mmap
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from autoseg.errors import AutosegError
from autoseg.preprocessing.cache import RERUN, case_files, read_properties

#: Bounds on the cases kept memory-mapped per process (two file descriptors each).
MIN_OPEN_CASES, MAX_OPEN_CASES = 16, 4096
#: Class locations kept in memory per process (10,000 points per class are 120 kB).
LOCATION_CACHE_BYTES = 32 * 2**20


class CacheMissingError(AutosegError):
    """A case the loader was asked for is not in the preprocessed cache."""


def round_half_up(value: float) -> int:
    """round() without banker's rounding: 0.5 of 5 samples forces 3, as nnU-Net's round(b * (1 - p)) rule."""
    return int(math.floor(value + 0.5))


def initial_patch_size(patch: Sequence[int], *, rotation: float, scale_max: float) -> tuple[int, ...]:
    """The enlarged "initial" patch (voxels, array order): the most any rotation and scaling can sample.

    Reading this box around the patch keeps rotated and scaled samples on real data instead of padding;
    the loader reads only the part of it that the drawn transform touches (augment.input_box).

    The patch's corners (half extents patch/2 around its centre) are rotated by every angle combination
    up to `rotation` radians about each rotated axis (capped at pi/2, beyond which the extent no longer
    grows), multiplied by the largest scale factor (batchgenerators' factor > 1 samples a larger
    region: zoom out), and the bounding box taken, plus one voxel for linear interpolation's neighbour.
    nnU-Net does the same but divides by 0.85 instead of the real scale range. Each axis is rounded up
    so that (initial - patch) is even: the final patch then sits exactly in the middle. A 2d patch is
    rotated in its plane (dummy 2D passes the in-plane axes only); a 3d one about all three axes.
    """
    size = np.asarray(patch, dtype=float)
    dim = len(size)
    angles = np.linspace(-min(rotation, math.pi / 2), min(rotation, math.pi / 2), 9 if dim == 3 else 91)
    corners = np.array(list(itertools.product(*[(-s / 2, s / 2) for s in size])))  # (2^dim, dim)
    extent = np.abs(corners).max(axis=0)
    n_angles = 1 if dim == 2 else 3
    if rotation > 0:
        for combo in itertools.product(angles, repeat=n_angles):
            rotated = corners @ _rotation_matrix(dim, combo).T
            extent = np.maximum(extent, np.abs(rotated).max(axis=0))
    needed = np.ceil(2 * extent * max(scale_max, 1.0)) + 1
    out = []
    for want, have in zip(needed.astype(int), np.asarray(patch, dtype=int)):
        want = max(want, have)
        out.append(int(want + (want - have) % 2))
    return tuple(out)


def _rotation_matrix(dim: int, angles: Sequence[float]) -> np.ndarray:
    """Rotation about each axis in turn (2d: one angle; 3d: about axes 0, 1, 2)."""
    if dim == 2:
        c, s = math.cos(angles[0]), math.sin(angles[0])
        return np.array([[c, -s], [s, c]])
    matrix = np.eye(3)
    for axis, angle in enumerate(angles):
        c, s = math.cos(angle), math.sin(angle)
        i, j = [a for a in range(3) if a != axis]
        step = np.eye(3)
        step[i, i], step[i, j], step[j, i], step[j, j] = c, -s, s, c
        matrix = step @ matrix
    return matrix


def crop_padded(array: np.ndarray, lower: Sequence[int], size: Sequence[int], *, fill: float) -> np.ndarray:
    """Copy the box [lower, lower + size) over the trailing len(size) axes of `array`; outside is `fill`.

    Only the overlap with the array is touched, so on a memory map only those pages are read.
    """
    n = len(size)
    lead = array.shape[: array.ndim - n]
    out = np.full((*lead, *size), fill, dtype=array.dtype)
    src, dst = [], []
    for low, length, extent in zip(lower, size, array.shape[array.ndim - n:]):
        start, stop = max(low, 0), min(low + length, extent)
        if start >= stop:
            return out
        src.append(slice(start, stop))
        dst.append(slice(start - low, stop - low))
    out[(Ellipsis, *dst)] = array[(Ellipsis, *src)]
    return out


@dataclass(frozen=True)
class PatchBox:
    """One sample's final patch: case index, slice (2d only, else None) and lower corner (voxels)."""

    case: int
    slice_index: int | None
    lower: tuple[int, ...]
    forced: bool


class CaseCache:
    """Read-only access to the cached cases of one configuration, memory-mapped on first use.

    Case shapes and the classes present are read once from the properties files. Memory maps are
    opened lazily in the process that uses them, from .npy headers parsed once per case, and kept
    open up to a limit derived from the process's open-file limit (a mapping costs no memory until
    pages are read, and the kernel can drop those pages again). Stored class locations are cached
    up to LOCATION_CACHE_BYTES per process.
    """

    def __init__(self, folder: str | Path, case_ids: Sequence[str], *, previous: str | Path | None = None) -> None:
        self.folder = Path(folder)
        self.previous = None if previous is None else Path(previous)  # cascade: <folder>/previous_<stage>
        self.case_ids = tuple(case_ids)
        if not self.case_ids:
            raise AutosegError("no training cases were given to the loader", path=self.folder,
                               hint="check the split: the fold has no training cases")
        self.shapes: list[tuple[int, ...]] = []
        self.classes: list[tuple[int, ...]] = []
        for case_id in self.case_ids:
            self._check_files(case_id)
            properties = read_properties(self.folder, case_id)
            self.shapes.append(tuple(properties.shape))
            self.classes.append(tuple(properties.classes))
        self.max_open = _open_limit()
        self._reset()

    def _reset(self) -> None:
        self._open: OrderedDict[int, tuple[np.ndarray, ...]] = OrderedDict()
        self._headers: dict[Path, tuple[np.dtype, tuple[int, ...], bool, int]] = {}
        self._locations: OrderedDict[int, dict[int, np.ndarray]] = OrderedDict()
        self._location_bytes = 0

    def _check_files(self, case_id: str) -> None:
        missing = [p for p in case_files(self.folder, case_id).values() if not p.is_file()]
        if missing:
            raise CacheMissingError(f"case {case_id!r} is not in the preprocessed cache ({missing[0].name} missing)",
                                    path=self.folder, hint=f"run `{RERUN}` for this configuration")
        if self.previous is not None and not (self.previous / f"{case_id}.npy").is_file():
            raise CacheMissingError(f"case {case_id!r} has no previous-stage segmentation", path=self.previous,
                                    hint="train the cascade fold through `autoseg train`, which gathers them from "
                                         "the previous stage's cross-validation")

    def __getstate__(self) -> dict[str, object]:
        state = {k: v for k, v in self.__dict__.items() if not k.startswith("_")}
        return state  # memory maps and caches are per process

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        self._reset()

    def arrays(self, index: int) -> tuple[np.ndarray, ...]:
        """(data (c, z, y, x), seg (z, y, x)[, previous stage (z, y, x)]) of case `index` as read-only
        memory maps; the third only for a cascade cache."""
        if index in self._open:
            self._open.move_to_end(index)
            return self._open[index]
        files = case_files(self.folder, self.case_ids[index])
        pair: tuple[np.ndarray, ...] = (self._map(files["data"]), self._map(files["seg"]))
        if self.previous is not None:
            pair = (*pair, self._map(self.previous / f"{self.case_ids[index]}.npy"))
        self._open[index] = pair
        while len(self._open) > self.max_open:
            self._open.popitem(last=False)
        return pair

    def _map(self, path: Path) -> np.ndarray:
        """np.load(path, mmap_mode="r") without re-parsing the header on every reopen."""
        if path not in self._headers:
            first = np.load(path, mmap_mode="r")
            if not isinstance(first, np.memmap) or first.size == 0:
                return first
            fortran = first.flags.f_contiguous and not first.flags.c_contiguous
            self._headers[path] = (first.dtype, first.shape, fortran, first.offset)
            return first
        dtype, shape, fortran, offset = self._headers[path]
        with open(path, "rb") as handle:
            buffer = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        return np.ndarray(shape, dtype, buffer=buffer, offset=offset, order="F" if fortran else "C")

    def locations(self, index: int, class_key: int) -> np.ndarray:
        """Stored voxel coordinates (n, 3) (z, y, x) of one class in case `index`."""
        if index not in self._locations:
            with np.load(case_files(self.folder, self.case_ids[index])["locations"]) as stored:
                self._locations[index] = {int(key): stored[key] for key in stored.files}
            self._location_bytes += sum(a.nbytes for a in self._locations[index].values())
            while self._location_bytes > LOCATION_CACHE_BYTES and len(self._locations) > 1:
                _, dropped = self._locations.popitem(last=False)
                self._location_bytes -= sum(a.nbytes for a in dropped.values())
        self._locations.move_to_end(index)
        return self._locations[index].get(class_key, np.zeros((0, 3), np.int32))

    @property
    def seg_dtype(self) -> np.dtype:
        """The cached segmentation's dtype (int8 or int16), read from the first case's header."""
        return np.load(case_files(self.folder, self.case_ids[0])["seg"], mmap_mode="r").dtype


def _open_limit() -> int:
    """Cases to keep mapped: two descriptors each, leaving room for everything else the process opens."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):
        return MIN_OPEN_CASES
    if soft == resource.RLIM_INFINITY:
        return MAX_OPEN_CASES
    return max(MIN_OPEN_CASES, min(MAX_OPEN_CASES, (soft - 256) // 2))


def choose_boxes(
    cache: CaseCache, patch: Sequence[int], batch_size: int, *, oversample: float, rng: np.random.Generator
) -> list[PatchBox]:
    """One batch of final-patch boxes: cases with replacement, the last round(oversample * b) forced.

    A forced sample picks one class present in its case uniformly (class-balanced, not voxel-balanced),
    then one stored voxel of it, and centres the patch there (clamped so the patch stays within the case
    where it fits). Other samples place the patch uniformly within the case along axes where it fits,
    and centre the case in the patch along axes where the case is smaller (`random_lower`). 2d
    configurations pick a slice first; a forced sample takes the slice of its voxel, so it shows the class.
    """
    n_forced = min(batch_size, round_half_up(oversample * batch_size))
    cases = rng.integers(len(cache.case_ids), size=batch_size)
    boxes = []
    for j, case in enumerate(cases):
        forced = j >= batch_size - n_forced
        boxes.append(_box(cache, int(case), patch, forced=forced, rng=rng))
    return boxes


def _box(cache: CaseCache, case: int, patch: Sequence[int], *, forced: bool,
         rng: np.random.Generator) -> PatchBox:
    shape = cache.shapes[case]
    two_d = len(patch) == 2
    present = cache.classes[case]
    if forced and present:
        key = present[int(rng.integers(len(present)))]
        points = cache.locations(case, key)
        if len(points):
            voxel = points[int(rng.integers(len(points)))]
            centre = voxel[1:] if two_d else voxel
            spatial = shape[1:] if two_d else shape
            lower = tuple(int(np.clip(c - p // 2, min(0, n - p), max(0, n - p)))
                          for c, p, n in zip(centre, patch, spatial))
            return PatchBox(case, int(voxel[0]) if two_d else None, lower, True)
    slice_index = int(rng.integers(shape[0])) if two_d else None
    spatial = shape[1:] if two_d else shape
    lower = tuple(random_lower(n, p, rng) for p, n in zip(patch, spatial))
    return PatchBox(case, slice_index, lower, forced)


def random_lower(extent: int, patch: int, rng: np.random.Generator) -> int:
    """Lower corner of a random patch along one axis: uniform over the case where the patch fits, and
    the case centred in the patch where it does not (an odd gap puts the spare voxel on either side).

    Centring is nnU-Net's rule and mirrors inference, which pads a small case evenly on both sides
    (inference.tiling.padding_for): the network trains on small cases where it will see them.
    """
    if extent >= patch:
        return int(rng.integers(0, extent - patch + 1))
    gap = patch - extent
    return -int(rng.integers(gap // 2, (gap + 1) // 2 + 1))


def read_box(cache: CaseCache, box: PatchBox, lower: Sequence[int], *, size: Sequence[int]
             ) -> tuple[np.ndarray, np.ndarray]:
    """Data (c, *size) and seg (1, *size) of the region [lower, lower + size) of the box's case (in its
    slice for 2d boxes); the final patch is `read_box(cache, box, box.lower, size=patch)`. A cascade cache
    adds the previous stage's segmentation as a second seg channel: (2, *size)."""
    data, *segs = cache.arrays(box.case)
    if box.slice_index is not None:
        data, segs = data[:, box.slice_index], [seg[box.slice_index] for seg in segs]
    labels = [crop_padded(seg, lower, size, fill=-1).astype(np.int16, copy=False) for seg in segs]
    return crop_padded(data, lower, size, fill=0.0), np.stack(labels)
