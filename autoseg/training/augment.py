"""Augmentation presets built on batchgenerators, and the label-side steps every batch goes through.

Arrays are batches (b, c, *patch) for data (float32) and (b, 1, *patch) for the segmentation, spatial
axes in array order ((z, y, x) or (y, x)). The default preset follows nnU-Net v2's training pipeline
(reference/nnunet-v2.md §6.5): rotation p 0.2 and scaling p 0.2 (0.7-1.4, one factor for all axes)
per sample, elastic deformation off, then Gaussian noise 0.1, blur 0.2, multiplicative brightness 0.15,
contrast 0.15, simulated low resolution 0.25, inverted gamma 0.1, gamma 0.3, mirroring along every
axis. Images are interpolated linearly, segmentations label by label (linear indicator + argmax) with
-1 outside, so labels keep their shape and stay aligned with the image. A cascade's previous-stage
segmentation travels as a second seg channel through all of this (moved like the label, untouched by
the intensity transforms), then becomes one-hot data channels, randomly dilated / eroded / opened /
closed (p 0.4) and stripped of a small connected component (p 0.2) as nnU-Net does (`perturb_previous`).

The spatial step runs per sample on batchgenerators' coordinate and interpolation functions (the ones
its SpatialTransform is made of): the transform is drawn first, so only the box of the case it
actually samples is read (a plain patch for the ~64 % of samples neither rotated nor scaled, at most
the enlarged "initial" patch). Everything after it runs on the whole batch as batchgenerators
transforms (`batch_transforms`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from autoseg.registry import Registry

#: nnU-Net's threshold: a 3d patch whose largest edge exceeds this many times its axis-0 edge gets
#: in-plane (dummy 2D) spatial augmentation, because rotating thick slices out of plane smears them.
ANISOTROPY_THRESHOLD = 3.0


@dataclass(frozen=True)
class SpatialSettings:
    """Rotation and scaling of one sample. Angles in radians, +-`rotation` about every rotated axis.

    `dummy_2d`: 3d patches are augmented slice-wise in the (y, x) plane (axis 0 folded into channels).
    Scale factors > 1 sample a larger region (zoom out); one factor for all axes.
    """

    rotation: float
    p_rotation: float = 0.2
    scale: tuple[float, float] = (0.7, 1.4)
    p_scale: float = 0.2
    dummy_2d: bool = False
    order_data: int = 1
    order_seg: int = 1


@dataclass(frozen=True)
class Augmentation:
    """A resolved preset for one configuration: the spatial part (None: plain crops), mirroring axes
    (array order, spatial axes only), whether intensity transforms run, and whether a cascade's
    previous-stage channels are perturbed (`perturb_previous`)."""

    spatial: SpatialSettings | None
    mirror_axes: tuple[int, ...]
    intensity: bool
    perturb_previous: bool = False


def uses_dummy_2d(patch: Sequence[int]) -> bool:
    """nnU-Net's rule: 3d patches with max(patch) / patch[0] > 3 are augmented in-plane."""
    return len(patch) == 3 and max(patch) / patch[0] > ANISOTROPY_THRESHOLD


def default_rotation(patch: Sequence[int]) -> float:
    """Rotation range (radians) as nnU-Net chooses it from the patch shape.

    2d: +-180 deg, or +-15 deg for elongated patches (max/min > 1.5), whose content would rotate out;
    3d: +-30 deg about each axis; dummy 2D: +-180 deg in-plane.
    """
    if len(patch) == 2:
        return math.radians(15.0) if max(patch) / min(patch) > 1.5 else math.pi
    return math.pi if uses_dummy_2d(patch) else math.radians(30.0)


PRESETS: Registry[Callable[[tuple[int, ...]], Augmentation]] = Registry("augmentation preset")


@PRESETS.register("default")
def _default(patch: tuple[int, ...]) -> Augmentation:
    spatial = SpatialSettings(rotation=default_rotation(patch), dummy_2d=uses_dummy_2d(patch))
    return Augmentation(spatial=spatial, mirror_axes=tuple(range(len(patch))), intensity=True, perturb_previous=True)


@PRESETS.register("none")
def _none(patch: tuple[int, ...]) -> Augmentation:
    return Augmentation(spatial=None, mirror_axes=(), intensity=False)


def resolve(name: str, patch: Sequence[int]) -> Augmentation:
    """The preset `name` ("default", "none", ...) for a patch; unknown names raise SettingsError."""
    return PRESETS.get(name)(tuple(int(p) for p in patch))


def initial_size(augmentation: Augmentation, patch: Sequence[int]) -> tuple[int, ...]:
    """The enlarged "initial" patch: the most any rotation and scaling of the preset can sample
    (see sampling.initial_patch_size); the patch itself without spatial augmentation."""
    from autoseg.training.sampling import initial_patch_size

    spatial = augmentation.spatial
    if spatial is None:
        return tuple(patch)
    if spatial.dummy_2d:
        plane = initial_patch_size(patch[1:], rotation=spatial.rotation, scale_max=spatial.scale[1])
        return (int(patch[0]), *plane)
    return initial_patch_size(patch, rotation=spatial.rotation, scale_max=spatial.scale[1])


@dataclass(frozen=True)
class SpatialDraw:
    """One sample's drawn spatial transform: angles in radians (one in-plane, or about axes 0, 1, 2;
    None: no rotation) and the scale factor (None: no scaling)."""

    angles: tuple[float, ...] | None
    scale: float | None


def draw_spatial(settings: SpatialSettings | None, rng: np.random.Generator, dim: int) -> SpatialDraw | None:
    """Draw rotation (p_rotation) and scaling (p_scale) independently, as batchgenerators' SpatialTransform
    does: angles uniform in +-rotation per axis; the factor below or above 1 with probability 1/2 each.
    None when neither applies (the sample is a plain crop)."""
    if settings is None:
        return None
    rotate, scale = rng.random() < settings.p_rotation, rng.random() < settings.p_scale
    if not (rotate or scale):
        return None
    n_angles = 1 if dim == 2 or settings.dummy_2d else 3
    angles = tuple(float(rng.uniform(-settings.rotation, settings.rotation)) for _ in range(n_angles))
    low, high = settings.scale
    factor = float(rng.uniform(low, 1.0) if rng.random() < 0.5 and low < 1 else rng.uniform(max(low, 1.0), high))
    return SpatialDraw(angles if rotate else None, factor if scale else None)


def sample_points(size: Sequence[int], draw: SpatialDraw) -> np.ndarray:
    """Where each output voxel samples the input: (dim, *size) offsets in voxels from the patch centre,
    built with batchgenerators' coordinate functions (zero-centred mesh, rotation, then scaling)."""
    from batchgenerators.augmentations.utils import (
        create_zero_centered_coordinate_mesh,
        rotate_coords_2d,
        rotate_coords_3d,
        scale_coords,
    )

    coords = create_zero_centered_coordinate_mesh(tuple(size))
    if draw.angles is not None:
        coords = rotate_coords_2d(coords, draw.angles[0]) if len(size) == 2 else rotate_coords_3d(coords, *draw.angles)
    if draw.scale is not None:
        coords = scale_coords(coords, draw.scale)
    return coords


def input_box(points: np.ndarray, lower: Sequence[int], patch: Sequence[int]
              ) -> tuple[tuple[int, ...], tuple[int, ...], np.ndarray]:
    """The smallest box of the case that `points` (offsets from the centre of the final patch at
    `lower`) touch with linear interpolation: (box lower, box size, points as indices into the box).

    Reading just this box is exact: every voxel an output value depends on is inside it, padded with
    0 / -1 where it leaves the case. It is never larger than the initial patch and usually much smaller.
    """
    centre = np.asarray(lower, dtype=float) + (np.asarray(patch, dtype=float) - 1) / 2
    corners = points[(slice(None), *np.ix_(*[[0, n - 1] for n in points.shape[1:]]))]  # linear map: extremes
    flat = corners.reshape(len(patch), -1)
    box_lower = np.floor(centre + flat.min(axis=1)).astype(int)
    box_upper = np.floor(centre + flat.max(axis=1)).astype(int) + 2
    shift = (centre - box_lower).reshape(-1, *([1] * len(patch)))
    return tuple(int(v) for v in box_lower), tuple(int(v) for v in box_upper - box_lower), points + shift


def resample_sample(data: np.ndarray, seg: np.ndarray, points: np.ndarray, *, settings: SpatialSettings
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Interpolate one sample at `points` (indices into the box) with batchgenerators' interpolate_img.

    data (c, *box) float32 and seg (1, *box) with -1 outside -> data (c, *out) float32, seg (1, *out)
    int16: images linear (order_data), labels by per-label indicator interpolation and argmax
    (order_seg), -1 where nothing of the case is sampled. Under dummy 2D the boxes are (c, z, y, x)
    and `points` (2, y, x): each slice is resampled in-plane.
    """
    from batchgenerators.augmentations.utils import interpolate_img

    images = data.reshape(-1, *data.shape[-points.shape[0]:])
    labels = seg.reshape(-1, *seg.shape[-points.shape[0]:]).astype(np.int16)
    out_data = np.stack([interpolate_img(im, points, settings.order_data, "constant", cval=0.0) for im in images])
    out_seg = np.stack([interpolate_img(lab, points, settings.order_seg, "constant", cval=-1, is_seg=True)
                        for lab in labels])
    lead = data.shape[: data.ndim - points.shape[0]]
    return (out_data.reshape(*lead, *points.shape[1:]).astype(np.float32, copy=False),
            out_seg.reshape(*seg.shape[: seg.ndim - points.shape[0]], *points.shape[1:]))


def batch_transforms(augmentation: Augmentation, *, masked_channels: Sequence[int] = ()) -> list[object]:
    """batchgenerators transforms for a stacked batch ({"data", "seg"}), in nnU-Net's order, up to
    mirroring; `masked_channels` (normalised inside the body only) are zeroed outside it afterwards."""
    from batchgenerators.transforms.color_transforms import (
        BrightnessMultiplicativeTransform,
        ContrastAugmentationTransform,
        GammaTransform,
    )
    from batchgenerators.transforms.noise_transforms import GaussianBlurTransform, GaussianNoiseTransform
    from batchgenerators.transforms.resample_transforms import SimulateLowResolutionTransform
    from batchgenerators.transforms.spatial_transforms import MirrorTransform

    transforms: list[object] = []
    if augmentation.intensity:
        dummy_2d = augmentation.spatial is not None and augmentation.spatial.dummy_2d
        transforms += [
            GaussianNoiseTransform(noise_variance=(0.0, 0.1), p_per_sample=0.1),
            GaussianBlurTransform((0.5, 1.0), different_sigma_per_channel=True, different_sigma_per_axis=True,
                                  p_per_sample=0.2, p_per_channel=0.5),
            BrightnessMultiplicativeTransform(multiplier_range=(0.75, 1.25), p_per_sample=0.15),
            ContrastAugmentationTransform(contrast_range=(0.75, 1.25), p_per_sample=0.15),
            SimulateLowResolutionTransform(zoom_range=(0.5, 1.0), per_channel=True, p_per_channel=0.5,
                                           order_downsample=0, order_upsample=1, p_per_sample=0.25,
                                           ignore_axes=(0,) if dummy_2d else None),
            GammaTransform((0.7, 1.5), invert_image=True, per_channel=True, retain_stats=True, p_per_sample=0.1),
            GammaTransform((0.7, 1.5), invert_image=False, per_channel=True, retain_stats=True, p_per_sample=0.3),
        ]
    if augmentation.mirror_axes:
        transforms.append(MirrorTransform(augmentation.mirror_axes))
    if masked_channels:
        transforms.append(MaskOutside(tuple(masked_channels)))
    return transforms


class MaskOutside:
    """Zero the masked channels where seg < 0 (outside the body), as their normalisation assumed.

    A batchgenerators-style transform: called with keyword arrays, returns the dict.
    """

    def __init__(self, channels: tuple[int, ...]) -> None:
        self.channels = channels

    def __call__(self, **batch: np.ndarray) -> dict[str, np.ndarray]:
        outside = batch["seg"][:, 0] < 0
        for channel in self.channels:
            batch["data"][:, channel][outside] = 0
        return batch


def deep_supervision_factors(strides: Sequence[Sequence[int]], *, enabled: bool = True) -> list[tuple[int, ...]]:
    """Per decoder output, highest resolution first: the cumulative stride (voxels per output voxel).

    One per stage except the lowest, i.e. the scales 1 / cumprod(strides)[:-1]; only (1, ..., 1)
    without deep supervision.
    """
    factors, total = [], np.ones(len(strides[0]), dtype=int)
    for stride in strides[:-1]:
        total = total * np.asarray(stride, dtype=int)
        factors.append(tuple(int(t) for t in total))
    return factors if enabled else factors[:1]


def downsample_target(seg: np.ndarray, factor: Sequence[int]) -> np.ndarray:
    """Nearest-neighbour downsampling of (b, 1, *patch) by integer factors: voxel i of the output is
    input voxel i * f + f // 2 (torch's "nearest-exact"), i.e. the centre of the covered block."""
    index = tuple(slice(f // 2, f // 2 + (n // f) * f, f) for f, n in zip(factor, seg.shape[2:]))
    return np.ascontiguousarray(seg[(slice(None), slice(None), *index)])


#: nnU-Net's cascade augmentation: per sample, a random morphological operation on each previous-stage
#: channel (ball radius 1-8 voxels), and removal of one random component smaller than 15 % of the patch.
P_MORPHOLOGY, MAX_RADIUS, P_REMOVE_COMPONENT, MAX_COMPONENT_FRACTION = 0.4, 8, 0.2, 0.15


def perturb_previous(channels: np.ndarray, rng: np.random.Generator) -> None:
    """Perturb one-hot previous-stage channels (b, n, *patch) in place, so the network learns to correct
    the previous stage rather than copy it. Channels stay 0/1 and never overlap."""
    from scipy import ndimage

    for sample in channels:
        if rng.random() < P_MORPHOLOGY:
            for c in rng.permutation(len(sample)):
                mask = sample[c] > 0
                changed = _morphology(mask, str(rng.choice(["dilate", "erode", "close", "open"])),
                                      int(rng.integers(1, MAX_RADIUS + 1)))
                added = changed & ~mask
                sample[c] = changed
                for other in range(len(sample)):
                    if other != c:
                        sample[other][added] = 0
        if rng.random() < P_REMOVE_COMPONENT:
            for c in range(len(sample)):
                components, count = ndimage.label(sample[c] > 0)
                if count == 0:
                    continue
                sizes = np.bincount(components.ravel())[1:]
                small = np.flatnonzero(sizes < MAX_COMPONENT_FRACTION * sample[c].size)
                if len(small):
                    sample[c][components == int(rng.choice(small)) + 1] = 0


def _morphology(mask: np.ndarray, operation: str, radius: int) -> np.ndarray:
    """Binary dilation / erosion / closing / opening with a Euclidean ball of `radius` voxels, through
    distance transforms: linear time whatever the radius (a ball of radius 8 has ~2,000 voxels)."""
    from scipy import ndimage

    def dilate(m: np.ndarray) -> np.ndarray:
        return ndimage.distance_transform_edt(~m) <= radius if m.any() and not m.all() else m.copy()

    def erode(m: np.ndarray) -> np.ndarray:
        return ndimage.distance_transform_edt(m) > radius if m.any() and not m.all() else m.copy()

    if operation == "dilate":
        return dilate(mask)
    if operation == "erode":
        return erode(mask)
    return erode(dilate(mask)) if operation == "close" else dilate(erode(mask))
