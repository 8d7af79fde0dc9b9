"""The embedded example dataset: small synthetic scans in the unchanged nnU-Net v2 raw layout.

Every case is a smooth body (deformed ellipsoid) holding an "organ" (label 1) and a "lesion"
(label 2, inside or touching the organ), drawn in millimetres so the anatomy keeps its physical
size whatever the spacing. Intensities follow the modality: CT in Hounsfield units (int16), MRI on
an arbitrary per-case scale with a smooth bias field (float32). Geometry is realistic on purpose
(non-unit, jittered spacing, non-zero origin, jittered shape) so that planning and resampling are
exercised, and `anisotropic=True` gives thick slices (~0.7 x 0.7 x 4-5 mm). Everything is
deterministic for a seed; case `i` depends only on (seed, i), not on `n_cases`.
Arrays are (z, y, x); `Geometry.file_spacing` and `origin` are in file order (x, y, z), mm.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from autoseg.errors import DatasetError, SettingsError
from autoseg.io import Geometry, write_image, write_label
from autoseg.log import get_logger
from autoseg.serialization import write_json

LABELS = {"background": 0, "organ": 1, "lesion": 2}
MODALITIES = {"ct": "CT", "mri": "MRI"}
FILE_ENDING = ".nii.gz"
_TEST_OFFSET = 100_000  # seed stream offset of the held-out imagesTs cases

log = get_logger("dataset")


@dataclass(frozen=True)
class SyntheticCase:
    """One generated case: image (z, y, x), label (z, y, x) uint8, and the file geometry."""

    image: np.ndarray
    label: np.ndarray
    geometry: Geometry


def make_example_dataset(
    root: str | Path,
    *,
    n_cases: int = 10,
    modality: str = "ct",
    anisotropic: bool = False,
    seed: int = 0,
    size: int = 48,
    n_test: int = 2,
    overwrite: bool = False,
) -> Path:
    """Write the example dataset to `root` (e.g. `.../Dataset900_Example`) and return its path.

    `size` is the typical number of voxels per in-plane axis (each case is jittered by about
    +-15%); `n_test` held-out cases go to imagesTs/, their labels to labelsTs/ (for `autoseg evaluate`).
    An existing dataset in `root` is replaced only with `overwrite=True`; other files in `root` are
    never touched.
    """
    key = _check_settings(n_cases=n_cases, modality=modality, seed=seed, size=size, n_test=n_test)
    root = Path(root).resolve()
    _prepare_root(root, overwrite=overwrite)
    settings = {"modality": key, "anisotropic": anisotropic, "size": size}
    for index in range(n_cases):
        case = synthesize_case((seed, index), **settings)
        case_id = f"case_{index:03d}"
        write_image(case.image, case.geometry, root / "imagesTr" / f"{case_id}_0000{FILE_ENDING}")
        write_label(case.label, case.geometry, root / "labelsTr" / f"{case_id}{FILE_ENDING}")
    for index in range(n_test):
        case = synthesize_case((seed, _TEST_OFFSET + index), **settings)
        write_image(case.image, case.geometry, root / "imagesTs" / f"test_{index:03d}_0000{FILE_ENDING}")
        write_label(case.label, case.geometry, root / "labelsTs" / f"test_{index:03d}{FILE_ENDING}")
    write_json(root / "dataset.json", _dataset_json(root.name, n_cases, key, anisotropic, seed, size))
    log.info("wrote example dataset %s (%d cases, %s)", root, n_cases, MODALITIES[key])
    return root


def synthesize_case(
    seed: int | Sequence[int],
    *,
    modality: str = "ct",
    anisotropic: bool = False,
    size: int = 64,
) -> SyntheticCase:
    """Generate one case in memory; the same seed always gives the same case."""
    rng = np.random.default_rng(list(seed) if isinstance(seed, Sequence) else seed)
    geometry = _sample_geometry(rng, size=size, anisotropic=anisotropic)
    grid = _physical_grid(geometry)
    shapes = _sample_anatomy(rng, geometry)
    implicit = {name: _implicit(grid, rng, **params) for name, params in shapes.items()}
    label = _label_map(implicit)
    if modality.lower() == "mri":
        image = _mri_intensities(rng, implicit, grid)
    else:
        image = _ct_intensities(rng, implicit)
    return SyntheticCase(image=image, label=label, geometry=geometry)


def _check_settings(*, n_cases: int, modality: str, seed: int, size: int, n_test: int) -> str:
    key = modality.lower()
    if key not in MODALITIES:
        raise SettingsError(f"unknown modality {modality!r}", hint="use 'ct' or 'mri'")
    if n_cases < 1 or n_test < 0:
        raise SettingsError(f"need at least one training case (got {n_cases}, test {n_test})",
                            hint="pass --cases 1 or more")
    if size < 8:
        raise SettingsError(f"size {size} is too small for a scan", hint="use --size 8 or more")
    if seed < 0:
        raise SettingsError(f"seed {seed} is negative", hint="use a seed of 0 or more")
    return key


def _prepare_root(root: Path, *, overwrite: bool) -> None:
    """Refuse to mix with an existing dataset unless asked; then remove only our own layout."""
    ours = [root / "dataset.json", root / "imagesTr", root / "labelsTr", root / "imagesTs", root / "labelsTs"]
    existing = [p for p in ours if p.exists()]
    if existing and not overwrite:
        raise DatasetError("the folder already holds a dataset", path=root,
                           hint="choose another folder or delete this one (Python API: overwrite=True)")
    for path in existing:
        if path.is_dir():
            for file in path.iterdir():
                if file.is_file():
                    file.unlink()
        else:
            path.unlink()
    root.mkdir(parents=True, exist_ok=True)


def _dataset_json(name: str, n_cases: int, modality: str, anisotropic: bool, seed: int, size: int) -> dict:
    return {
        "name": name,
        "description": "Synthetic example dataset generated by autoseg (body, organ, lesion)",
        "reference": (f"autoseg.dataset.make_example_dataset(n_cases={n_cases}, modality={modality!r}, "
                      f"anisotropic={anisotropic}, seed={seed}, size={size})"),
        "licence": "CC0 (synthetic data)",
        "channel_names": {"0": MODALITIES[modality]},
        "labels": dict(LABELS),
        "numTraining": n_cases,
        "file_ending": FILE_ENDING,
    }


def _sample_geometry(rng: np.random.Generator, *, size: int, anisotropic: bool) -> Geometry:
    """Spacing (mm, file order x, y, z), shape (z, y, x) and a non-zero origin."""
    if anisotropic:
        in_plane, through = 0.7 * rng.uniform(0.93, 1.07), rng.uniform(4.0, 5.0)
    else:
        in_plane, through = 0.8 * rng.uniform(0.9, 1.1), 1.5 * rng.uniform(0.87, 1.13)
    nx, ny = (max(4, round(size * rng.uniform(0.85, 1.15))) for _ in range(2))
    # the slab covers about size * 1.5 mm, so thick slices mean correspondingly fewer of them
    nz = max(4, round(size * 1.5 / through * rng.uniform(0.85, 1.15)))
    spacing = (float(in_plane), float(in_plane), float(through))
    extent = np.array([nx, ny, nz]) * np.array(spacing)
    origin = -extent / 2 + rng.uniform(-30.0, 30.0, size=3) + np.array([0.0, 0.0, -200.0])
    return Geometry(
        shape=(nz, ny, nx),
        file_spacing=spacing,
        origin=tuple(round(float(o), 3) for o in origin),
        direction=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0),
    )


def _physical_grid(geometry: Geometry) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Open (broadcastable) z, y, x coordinates in mm relative to the volume centre."""
    spacing = geometry.array_spacing
    axes = []
    for axis, (n, s) in enumerate(zip(geometry.shape, spacing, strict=True)):
        coords = ((np.arange(n, dtype=np.float32) - (n - 1) / 2) * np.float32(s))
        shape = [1, 1, 1]
        shape[axis] = n
        axes.append(coords.reshape(shape))
    return axes[0], axes[1], axes[2]


def _sample_anatomy(rng: np.random.Generator, geometry: Geometry) -> dict[str, dict]:
    """Centres and radii (mm, z, y, x) of body, organ and lesion, nested inside each other."""
    extent = np.array(geometry.shape) * np.array(geometry.array_spacing)
    body_r = extent * np.array([0.62, 0.40, 0.45]) * rng.uniform(0.9, 1.1, size=3)
    body_c = extent * rng.uniform(-0.03, 0.03, size=3)
    organ_r = body_r[1:].mean() * rng.uniform(0.55, 0.7) * rng.uniform(0.85, 1.15, size=3)
    organ_c = body_c + rng.uniform(-0.3, 0.3, size=3) * (body_r - organ_r).clip(min=0)
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction)
    lesion_r = organ_r.mean() * rng.uniform(0.45, 0.6) * rng.uniform(0.9, 1.1, size=3)
    lesion_c = organ_c + direction * organ_r * rng.uniform(0.2, 0.8)
    return {
        "body": {"centre": body_c, "radii": body_r, "wobble": 0.08, "wavelength": extent.min()},
        "organ": {"centre": organ_c, "radii": organ_r, "wobble": 0.25, "wavelength": 2.5 * organ_r.mean()},
        "lesion": {"centre": lesion_c, "radii": lesion_r, "wobble": 0.2, "wavelength": 3 * lesion_r.mean()},
    }


def _implicit(grid: tuple[np.ndarray, ...], rng: np.random.Generator, *, centre: np.ndarray,
              radii: np.ndarray, wobble: float, wavelength: float) -> np.ndarray:
    """Deformed ellipsoid as an implicit function: < 1 inside, > 1 outside (float32, z, y, x)."""
    terms = zip(grid, centre, radii, strict=True)
    value = sum(((g - np.float32(c)) / np.float32(r)) ** 2 for g, c, r in terms)
    return value + np.float32(wobble) * _smooth_field(grid, rng, wavelength=wavelength)


def _smooth_field(grid: tuple[np.ndarray, ...], rng: np.random.Generator, *, wavelength: float,
                  n_terms: int = 5) -> np.ndarray:
    """Random smooth field (sum of plane waves), roughly in [-1, 1], features of `wavelength` mm."""
    field = np.zeros(np.broadcast_shapes(*(g.shape for g in grid)), dtype=np.float32)
    for _ in range(n_terms):
        direction = rng.normal(size=3)
        k = direction / np.linalg.norm(direction) * 2 * np.pi / wavelength * rng.uniform(0.7, 1.3)
        phase = np.float32(rng.uniform(0, 2 * np.pi))
        field += np.cos(sum(np.float32(kk) * g for kk, g in zip(k, grid, strict=True)) + phase)
    return field * np.float32(1.0 / np.sqrt(n_terms))


def _label_map(implicit: dict[str, np.ndarray]) -> np.ndarray:
    """uint8 labels: organ (1) inside the body, lesion (2) inside the body, drawn over the organ."""
    body = implicit["body"] < 1
    label = np.zeros(body.shape, dtype=np.uint8)
    label[(implicit["organ"] < 1) & body] = 1
    label[(implicit["lesion"] < 1) & body] = 2
    # tiny volumes may miss a structure entirely: keep at least its most central voxel
    if not (label == 2).any():
        label[np.unravel_index(np.argmin(implicit["lesion"]), label.shape)] = 2
    if not (label == 1).any():
        organ = np.where(label == 2, np.inf, implicit["organ"])
        label[np.unravel_index(np.argmin(organ), label.shape)] = 1
    return label


def _soft(implicit: np.ndarray, width: float = 0.15) -> np.ndarray:
    """Partial-volume weight in [0, 1]: 1 well inside, 0 well outside, a ramp at the border."""
    return np.clip((1 - implicit) / np.float32(width) + np.float32(0.5), 0, 1)


def _blend(base: np.ndarray, weight: np.ndarray, value: float) -> np.ndarray:
    return base + weight * (np.float32(value) - base)


def _ct_intensities(rng: np.random.Generator, implicit: dict[str, np.ndarray]) -> np.ndarray:
    """Hounsfield units as int16: air -1000, soft tissue ~40, organ 80-100, lesion +-50-80 from the organ."""
    organ_hu = rng.uniform(80, 100)
    lesion_hu = organ_hu + rng.choice([-1, 1]) * rng.uniform(50, 80)
    image = np.full(implicit["body"].shape, -1000, dtype=np.float32)
    body = _soft(implicit["body"])
    image = _blend(image, body, rng.uniform(30, 50))
    image = _blend(image, _soft(implicit["organ"]) * body, organ_hu)
    image = _blend(image, _soft(implicit["lesion"]) * body, lesion_hu)
    image += rng.normal(0, rng.uniform(10, 20), size=image.shape).astype(np.float32)
    return np.clip(np.rint(image), -1024, 3071).astype(np.int16)


def _mri_intensities(rng: np.random.Generator, implicit: dict[str, np.ndarray],
                     grid: tuple[np.ndarray, ...]) -> np.ndarray:
    """Arbitrary positive scale (float32): background ~0, tissue ~300 x gain, smooth bias field."""
    organ_value = rng.uniform(450, 600)
    lesion_value = organ_value * rng.choice([0.55, 1.45]) * rng.uniform(0.9, 1.1)
    image = np.zeros(implicit["body"].shape, dtype=np.float32)
    body = _soft(implicit["body"])
    image = _blend(image, body, rng.uniform(250, 350))
    image = _blend(image, _soft(implicit["organ"]) * body, organ_value)
    image = _blend(image, _soft(implicit["lesion"]) * body, lesion_value)
    extent = max(float(np.ptp(g)) for g in grid) + 1.0
    bias = np.exp(np.float32(0.2) * _smooth_field(grid, rng, wavelength=2 * extent, n_terms=3))
    image *= bias * np.float32(rng.uniform(0.6, 2.5))
    sigma = np.float32(0.03 * float(image.max()) + 1.0)
    real = image + rng.normal(0, 1, size=image.shape).astype(np.float32) * sigma
    imag = rng.normal(0, 1, size=image.shape).astype(np.float32) * sigma
    return np.sqrt(real * real + imag * imag)  # Rician noise: positive, ~sigma in the background
