"""plan(fingerprint, dataset) -> Plans: the 2d, 3d_fullres, 3d_lowres and 3d_cascade_fullres setups.

Rules and the nnU-Net numbers they match are listed in docs/planning.md. Inside a Configuration
every per-axis value is in array order after the plan's transpose (coarsest axis first).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from autoseg.dataset.contract import Dataset
from autoseg.errors import PlanError
from autoseg.fingerprint.contract import Fingerprint
from autoseg.io.geometry import DUMMY_2D_SPACING
from autoseg.model.contract import Topology
from autoseg.model.families import DEFAULT_NETWORK, NETWORKS, NetworkFamily
from autoseg.planning.contract import Configuration, Plans, Resampling
from autoseg.planning.identifier import DEFAULT_PLANS, plans_identifier
from autoseg.planning.memory import MIN_BATCH_SIZE, batch_capacity, estimate_memory_gb, fits
from autoseg.planning.normalization import normalization_schemes, use_mask_for_norm
from autoseg.planning.spacing import permute, resampled_median_shape, target_spacing, transpose_for
from autoseg.planning.topology import fit_patch, initial_patch, pooling_plan

log = logging.getLogger("autoseg.planning")

#: A batch may hold at most this fraction of the dataset's voxels (against overfitting).
MAX_DATASET_COVERED = 0.05
#: 3d_lowres is planned when the fullres patch covers less than this fraction of the median image.
LOWRES_THRESHOLD = 0.25
#: Factor by which the lowres spacing grows per step.
LOWRES_SPACING_STEP = 1.03
#: 3d_lowres is dropped unless its median image has at least this many times fewer voxels.
LOWRES_MIN_REDUCTION = 2.0
#: Configurations whose arrays depend only on the fingerprint and the channel names (target spacing,
#: normalisation), never on the network or the budget: every plans identifier shares their cache.
SHARED_DATA = ("2d", "3d_fullres")


@dataclass(frozen=True)
class _Setting:
    """What every configuration of one plan shares."""

    in_channels: int
    num_classes: int
    cascade_channels: int
    budget_gb: float
    num_training: int
    normalization: tuple[str, ...]
    use_mask: tuple[bool, ...]
    plans_name: str
    family: NetworkFamily
    upsampling: str | None


def plan(
    fingerprint: Fingerprint, dataset: Dataset, *, memory_budget_gb: float = 8.0, plans_name: str | None = None,
    network: str = DEFAULT_NETWORK, upsampling: str | None = None,
) -> Plans:
    """Plan every configuration of network family `network` for a dataset and a GPU memory budget (GiB).

    3D data gets 3d_fullres, and 3d_lowres + 3d_cascade_fullres when the fullres patch covers
    less than 25 % of the median image; every dataset gets 2d (in-plane axes after transpose).
    `upsampling` (None: the family's default) chooses the decoder's upsampling step; `plans_name`
    defaults to the plans identifier of the two (`autoseg` for the default U-Net).
    """
    family = NETWORKS.get(network)
    plans_name = plans_name or plans_identifier(family.name, upsampling)
    spacings, shapes = _checked_geometry(fingerprint, dataset, memory_budget_gb)
    target = target_spacing(spacings, shapes)
    forward, backward = transpose_for(target)
    fullres_spacing = permute(target, forward)
    median = permute(resampled_median_shape(spacings, shapes, target), forward)
    setting = _setting(fingerprint, dataset, memory_budget_gb, plans_name)
    setting = dataclasses.replace(setting, family=family, upsampling=upsampling)
    dataset_voxels = math.prod(median) * setting.num_training
    configurations: dict[str, Configuration] = {}
    if median[0] == 1 or _unet_fits_in(fullres_spacing[1:], median[1:]):
        configurations["2d"] = _configure("2d", fullres_spacing[1:], median[1:], dataset_voxels=dataset_voxels,
                                       setting=setting)
    else:
        log.warning("no 2d configuration: the median slice %s is too small to downsample", median[1:])
    if median[0] != 1:
        configurations.update(_plan_3d(fullres_spacing, median, setting))
    return Plans(
        dataset_name=dataset.name,
        plans_name=plans_name,
        fingerprint_hash=fingerprint.source_hash,
        memory_budget_gb=float(memory_budget_gb),
        transpose_forward=forward,
        transpose_backward=backward,
        original_median_spacing=permute(tuple(float(v) for v in np.median(spacings, axis=0)), forward),
        original_median_shape=permute(tuple(int(round(v)) for v in np.median(shapes, axis=0)), forward),
        channel_names=dataset.channel_names,
        intensity=fingerprint.intensity,
        num_classes=dataset.num_classes,
        configurations=configurations,
    )


def _plan_3d(spacing: tuple[float, ...], median: tuple[float, ...], setting: _Setting) -> dict[str, Configuration]:
    """3d_fullres, plus 3d_lowres and 3d_cascade_fullres when the data is large for the patch."""
    fullres = _configure("3d_fullres", spacing, median, dataset_voxels=math.prod(median) * setting.num_training,
                         setting=setting)
    lowres = _plan_lowres(fullres, median, setting)
    if lowres is None:
        return {"3d_fullres": fullres}
    fullres = dataclasses.replace(fullres, batch_dice=True)
    lowres = dataclasses.replace(lowres, batch_dice=False, next_stage="3d_cascade_fullres")
    return {"3d_fullres": fullres, "3d_lowres": lowres, "3d_cascade_fullres": _cascade(fullres, setting)}


def _plan_lowres(fullres: Configuration, median: tuple[float, ...], setting: _Setting) -> Configuration | None:
    """Coarsen the spacing in 3 % steps (first only axes more than 2x finer than the coarsest)
    until the patch covers 25 % of the median image; None when not needed or not worth it."""
    fullres_voxels = math.prod(median)
    if math.prod(fullres.patch_size) / fullres_voxels >= LOWRES_THRESHOLD:
        return None
    spacing = np.asarray(fullres.spacing, dtype=np.float64)
    lowres, lowres_voxels = None, fullres_voxels
    while lowres is None or math.prod(lowres.patch_size) / lowres_voxels < LOWRES_THRESHOLD:
        fine = spacing.max() / spacing > 2
        grow = fine if fine.any() else np.ones_like(fine)
        spacing = np.where(grow, spacing * LOWRES_SPACING_STEP, spacing)
        lowres_median = tuple(float(f / s * m) for f, s, m in zip(fullres.spacing, spacing, median))
        lowres_voxels = math.prod(lowres_median)
        rounded = tuple(float(round(m)) for m in lowres_median)
        if not _unet_fits_in(tuple(spacing), rounded):
            log.info("no 3d_lowres: its median image %s would be too small to downsample", rounded)
            return None
        lowres = _configure("3d_lowres", tuple(float(s) for s in spacing), rounded,
                            dataset_voxels=lowres_voxels * setting.num_training, setting=setting)
    if fullres_voxels / lowres_voxels < LOWRES_MIN_REDUCTION:
        log.info("no 3d_lowres: its median image would be only %.2fx smaller", fullres_voxels / lowres_voxels)
        return None
    return lowres


def _cascade(fullres: Configuration, setting: _Setting) -> Configuration:
    """3d_fullres again, fed the 3d_lowres segmentation as extra one-hot input channels, on the 3d_fullres
    preprocessed data (every identifier: the previous stage's predictions are stored in the cache under
    a folder named by the identifier, `autoseg.preprocessing.previous.previous_dir`)."""
    in_channels = setting.in_channels + setting.cascade_channels
    topology, patch = fullres.topology, fullres.patch_size
    return dataclasses.replace(
        fullres,
        name="3d_cascade_fullres",
        previous_stage="3d_lowres",
        data_id=fullres.data_id,
        parameter_count=setting.family.parameters(topology, in_channels=in_channels,
                                                  num_classes=setting.num_classes),
        estimated_memory_gb=estimate_memory_gb(topology, patch, fullres.batch_size, in_channels=in_channels,
                                               num_classes=setting.num_classes),
    )


def _configure(
    name: str, spacing: Sequence[float], median: Sequence[float], *, dataset_voxels: float, setting: _Setting
) -> Configuration:
    """Patch, topology and batch for one spacing and median shape (both in transposed order)."""
    def fits_min_batch(topology: Topology, patch: tuple[int, ...]) -> bool:
        return fits(topology, patch, MIN_BATCH_SIZE, budget_gb=setting.budget_gb, in_channels=setting.in_channels,
                    num_classes=setting.num_classes)

    def family_topology(stage_plan: Topology) -> Topology:
        return setting.family.plan_topology(stage_plan, setting.upsampling)

    topology, patch, ok = fit_patch(spacing, median, fits_min_batch, make=family_topology)
    if not ok:
        raise _too_small(name, topology, patch, setting=setting)
    batch, notes = _batch_size(topology, patch, dataset_voxels=dataset_voxels, setting=setting)
    notes += _smaller_patch_note(spacing, median, patch, fits_min_batch, setting)
    sizes = {"in_channels": setting.in_channels, "num_classes": setting.num_classes}
    config = Configuration(
        name=name,
        spacing=tuple(float(s) for s in spacing),
        median_shape=tuple(int(round(m)) for m in median),
        patch_size=patch,
        batch_size=batch,
        batch_dice=name == "2d",
        normalization=setting.normalization,
        use_mask_for_norm=setting.use_mask,
        resampling=Resampling(),
        topology=topology,
        data_id=_data_id(name, setting),
        estimated_memory_gb=estimate_memory_gb(topology, patch, batch, **sizes),
        parameter_count=setting.family.parameters(topology, **sizes),
        receptive_field=setting.family.receptive_field(topology),
        notes=notes,
    )
    log.info("%s: %s, patch %s, batch %d, %d stages", name, setting.family.name, patch, batch, topology.n_stages)
    return config


def _data_id(name: str, setting: _Setting) -> str:
    """The cache folder name: the default plans' for 2d and 3d_fullres (the same arrays for every
    network, as nnU-Net's ResEnc plans reuse nnUNetPlans' data); 3d_lowres's spacing follows the
    family's 3d_fullres patch, so another identifier's 3d_lowres has its own."""
    owner = DEFAULT_PLANS if name in SHARED_DATA else setting.plans_name
    return f"{owner}_{name}"


def _batch_size(
    topology: Topology, patch: tuple[int, ...], *, dataset_voxels: float, setting: _Setting
) -> tuple[int, tuple[str, ...]]:
    """The budget's capacity in samples rounded to nearest (as nnU-Net), at most 5 % of the
    dataset's voxels, at least 2; with a note saying which rule decided."""
    capacity = batch_capacity(topology, patch, setting.budget_gb, in_channels=setting.in_channels,
                              num_classes=setting.num_classes)
    by_memory = max(round(capacity), MIN_BATCH_SIZE)
    by_dataset = round(dataset_voxels * MAX_DATASET_COVERED / math.prod(patch))
    batch = max(min(by_memory, by_dataset), MIN_BATCH_SIZE)
    if by_dataset < by_memory:
        note = f"batch limited to 5% of the dataset's voxels (memory would allow {by_memory})"
        return batch, (note if by_dataset >= MIN_BATCH_SIZE else note + f"; raised to the minimum {batch}",)
    return batch, ()


def _smaller_patch_note(spacing: Sequence[float], median: Sequence[float], patch: tuple[int, ...],
                        fits_min_batch: Callable[[Topology, tuple[int, ...]], bool], setting: _Setting
                        ) -> tuple[str, ...]:
    """A note when the family's patch is smaller than the default U-Net's at this spacing and budget (a
    network that is heavier per voxel, e.g. one that never downsamples, gets less context per sample)."""
    default = NETWORKS.get(DEFAULT_NETWORK)
    if setting.family.name == default.name:
        return ()
    _, unet_patch, _ = fit_patch(spacing, median, fits_min_batch, make=default.plan_topology)
    if math.prod(patch) >= math.prod(unet_patch):
        return ()
    share = math.prod(patch) / math.prod(unet_patch)
    return (f"patch {'x'.join(map(str, patch))} is {share:.0%} of the U-Net's {'x'.join(map(str, unet_patch))} "
            f"at this spacing and budget: {setting.family.name} needs more memory per voxel",)


def _unet_fits_in(spacing: Sequence[float], median: Sequence[float]) -> bool:
    """True when an image of the median shape can be downsampled at least once."""
    return len(pooling_plan(spacing, initial_patch(spacing, median)).strides) >= 2


def _too_small(name: str, topology: Topology, patch: tuple[int, ...], *, setting: _Setting) -> PlanError:
    if topology.n_stages < 2:
        return PlanError(
            f"{name}: a patch of {patch} voxels (the median image) is too small for a U-Net",
            hint="a U-Net needs at least 8 voxels along one axis (12 when only one axis qualifies)",
        )
    need = estimate_memory_gb(topology, patch, MIN_BATCH_SIZE, in_channels=setting.in_channels,
                              num_classes=setting.num_classes)
    return PlanError(
        f"{name}: a {setting.budget_gb:g} GiB memory budget does not hold batch {MIN_BATCH_SIZE} even at the "
        f"smallest patch {patch} (estimated {need:.2f} GiB)",
        hint=f"plan with a memory budget of at least {math.ceil(need * 10) / 10:g} GiB",
    )


def _setting(fingerprint: Fingerprint, dataset: Dataset, budget_gb: float, plans_name: str) -> _Setting:
    schemes = normalization_schemes(dataset.channel_names)
    num_training = dataset.num_training if dataset.num_training > 0 else len(fingerprint.cases)
    return _Setting(
        in_channels=len(dataset.channel_names),
        num_classes=dataset.num_classes,
        cascade_channels=len(dataset.foreground_values),
        budget_gb=float(budget_gb),
        num_training=num_training,
        normalization=schemes,
        use_mask=use_mask_for_norm(schemes, fingerprint.median_relative_size_after_crop),
        plans_name=plans_name,
        family=NETWORKS.get(DEFAULT_NETWORK),
        upsampling=None,
    )


def _checked_geometry(
    fingerprint: Fingerprint, dataset: Dataset, budget_gb: float
) -> tuple[list[tuple[float, ...]], list[tuple[int, ...]]]:
    """Per-case spacings and cropped shapes as 3 axes (a 2D case gets a leading axis of 1 voxel
    at the dummy spacing), after checking what planning cannot work without."""
    where = f"fingerprint of {fingerprint.dataset_name}"
    if not fingerprint.cases:
        raise PlanError(f"{where} has no cases", hint="add training cases, then rerun `autoseg fingerprint`")
    if len(fingerprint.channel_names) != len(dataset.channel_names):
        raise PlanError(
            f"{where} has {len(fingerprint.channel_names)} channels, dataset.json has {len(dataset.channel_names)}",
            hint="the fingerprint is stale: rerun `autoseg fingerprint` with --force",
        )
    if not (math.isfinite(budget_gb) and budget_gb > 0):
        raise PlanError(f"memory budget {budget_gb!r} GiB is not a positive number",
                        hint="give the GPU memory in GiB, e.g. 8")
    spacings, shapes = [], []
    for case in fingerprint.cases:
        spacing, shape = tuple(case.spacing), tuple(case.shape_after_crop)
        if len(spacing) == 2 and len(shape) == 2:
            spacing, shape = (DUMMY_2D_SPACING, *spacing), (1, *shape)
        if len(spacing) != 3 or len(shape) != 3:
            raise PlanError(f"{where}: case {case.case_id} has spacing {spacing} and shape {shape}",
                            hint="every case needs 3 spacings and 3 shape entries (z, y, x)")
        if min(spacing) <= 0 or min(shape) <= 0 or not all(math.isfinite(s) for s in spacing):
            raise PlanError(f"{where}: case {case.case_id} has spacing {spacing} and shape {shape}",
                            hint="fix the image header (spacing must be positive), then rerun fingerprinting")
        spacings.append(spacing)
        shapes.append(shape)
    return spacings, shapes
