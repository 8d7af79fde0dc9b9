"""Bounds a plans file must respect before anything is built from it.

A plans.json from elsewhere (a model archive, a hand edit) can ask for a 100000^3 patch, a spacing of
1e-4 mm or 100000 features: such a file would fail much later with a PiB allocation or never finish
resampling. The bounds are generous (far beyond any plan autoseg or nnU-Net writes) and only stop
values that cannot be meant. Pure Python on the contract.
"""

from __future__ import annotations

import math

from autoseg.planning.contract import Configuration, Plans

#: Largest patch edge (voxels) and patch size (voxels) of one sample.
MAX_PATCH_EDGE = 4096
MAX_PATCH_VOXELS = 2**25
#: Spacing bounds in mm (0.001 mm = 1 micrometre, below light microscopy's; 10 m is no scan).
MIN_SPACING_MM, MAX_SPACING_MM = 1e-3, 1e4
MAX_BATCH = 65536
MAX_FEATURES = 8192
MAX_STAGES = 16
MAX_KERNEL = 15
MAX_CLASSES = 10000
MAX_CHANNELS = 256


def plans_problems(plans: Plans) -> list[str]:
    """Every value of `plans` outside the bounds above, as readable sentences (empty: the plans are sane)."""
    problems = []
    if not 1 <= plans.num_classes <= MAX_CLASSES:
        problems.append(f"num_classes {plans.num_classes} (1 to {MAX_CLASSES})")
    if not 1 <= len(plans.channel_names) <= MAX_CHANNELS:
        problems.append(f"{len(plans.channel_names)} channels (1 to {MAX_CHANNELS})")
    orders = {"transpose_forward": plans.transpose_forward, "transpose_backward": plans.transpose_backward}
    for name, order in orders.items():
        if sorted(order) != list(range(len(order))) or len(order) not in (2, 3):
            problems.append(f"{name} {order} is not a permutation of the axes")
    for name, config in plans.configurations.items():
        problems += [f"{name}: {p}" for p in _configuration_problems(config)]
    return problems


def _configuration_problems(config: Configuration) -> list[str]:
    problems = []
    patch, spacing, topology = config.patch_size, config.spacing, config.topology
    if not patch or any(not 1 <= p <= MAX_PATCH_EDGE for p in patch) or math.prod(patch) > MAX_PATCH_VOXELS:
        problems.append(f"patch {patch} (edges 1 to {MAX_PATCH_EDGE}, at most {MAX_PATCH_VOXELS} voxels)")
    if len(spacing) != len(patch) or any(not (MIN_SPACING_MM <= s <= MAX_SPACING_MM) for s in spacing):
        problems.append(f"spacing {spacing} mm ({MIN_SPACING_MM:g} to {MAX_SPACING_MM:g} mm per axis of the patch)")
    if not 1 <= config.batch_size <= MAX_BATCH:
        problems.append(f"batch size {config.batch_size} (1 to {MAX_BATCH})")
    if not 1 <= topology.n_stages <= MAX_STAGES:
        problems.append(f"{topology.n_stages} stages (1 to {MAX_STAGES})")
    if any(not 1 <= f <= MAX_FEATURES for f in topology.features_per_stage):
        problems.append(f"features {topology.features_per_stage} (1 to {MAX_FEATURES} per stage)")
    if any(not 1 <= k <= MAX_KERNEL for kernel in topology.kernel_sizes for k in kernel):
        problems.append(f"kernel sizes {topology.kernel_sizes} (1 to {MAX_KERNEL})")
    if any(not 1 <= s <= MAX_PATCH_EDGE for stride in topology.strides for s in stride):
        problems.append(f"strides {topology.strides}")
    return problems
