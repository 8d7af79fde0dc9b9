"""Planner rules, properties, and nnU-Net's own plans (reference §4.10) as golden values."""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from autoseg.dataset.contract import Dataset, LabelDef
from autoseg.errors import PlanError
from autoseg.fingerprint.contract import CaseFingerprint, Fingerprint, IntensityStats
from autoseg.planning import Plans, estimate_memory_gb, plan, summarize
from autoseg.planning.normalization import normalization_scheme, normalization_schemes, use_mask_for_norm
from autoseg.planning.spacing import target_spacing, transpose_for
from autoseg.planning.topology import MIN_FEATURE_MAP_EDGE, pooling_plan
from autoseg.serialization import load_contract, save_contract

Case = tuple[tuple[float, ...], tuple[int, ...]]


def fingerprint(cases: list[Case], channels: tuple[str, ...] = ("MRI",), crop: float = 1.0) -> Fingerprint:
    """A fingerprint from (spacing, shape after crop) per case, in array order (z, y, x)."""
    stats = IntensityStats(mean=0.0, std=1.0, median=0.0, min=-1.0, max=1.0,
                           percentile_00_5=-1.0, percentile_99_5=1.0)
    return Fingerprint(
        dataset_name="Dataset999_Test",
        source_hash="hash",
        channel_names=channels,
        cases=tuple(CaseFingerprint(f"case_{i:03d}", tuple(sp), tuple(sh), tuple(sh), 1.0)
                    for i, (sp, sh) in enumerate(cases)),
        intensity=(stats,) * len(channels),
        median_relative_size_after_crop=crop,
        samples_per_case=10,
    )


def dataset(n: int, channels: tuple[str, ...] = ("MRI",), labels: int = 2) -> Dataset:
    defs = (LabelDef("background", (0,)),) + tuple(LabelDef(f"label{i}", (i,)) for i in range(1, labels + 1))
    return Dataset("Dataset999_Test", "/nonexistent", channels, defs, ".nii.gz", n, ())


# --- the nnU-Net anchors (§4.10); per-case shapes chosen to reproduce its median shapes -------------

def hippocampus(n: int = 260) -> tuple[Fingerprint, Dataset]:
    return fingerprint([((1.0, 1.0, 1.0), (36, 50, 35))] * n), dataset(n)


def heart() -> tuple[Fingerprint, Dataset]:
    """Heart-like: 20 MRI at 1.37x1.25x1.25 mm, median ~115x330x232 (nnU-Net's 2d patch 384x256
    implies a median above 320 along y)."""
    return fingerprint([((1.37, 1.25, 1.25), (115, 330, 232))] * 20), dataset(20, labels=1)


def abdominal_ct() -> tuple[Fingerprint, Dataset]:
    """Abdominal-CT-like: 300 CT, z 1.7-5 mm (median 2.5), in-plane 0.6-0.95 mm (median 0.79), the
    same physical extent, so every case resamples to 170x452x504 voxels."""
    z = [(1.7, 250), (2.5, 170), (5.0, 85)]
    xy = [(0.6, 595, 664), (0.79, 452, 504), (0.95, 376, 419)]
    cases = [((zs, s, s), (zn, yn, xn)) for (zs, zn), (s, yn, xn) in zip(z * 100, xy * 100)]
    return fingerprint(cases, channels=("CT",)), dataset(300, channels=("CT",), labels=2)


def acdc() -> tuple[Fingerprint, Dataset]:
    """ACDC-like: 200 cine MRI, 85 % at 10 mm slices (9 slices), 15 % at 5 mm (18 slices)."""
    cases = [((10.0, 1.55, 1.55), (9, 246, 213))] * 170 + [((5.0, 1.55, 1.55), (18, 246, 213))] * 30
    return fingerprint(cases, channels=("cine",)), dataset(200, channels=("cine",), labels=3)


def test_hippocampus_like() -> None:
    plans = plan(*hippocampus())
    assert set(plans.configurations) == {"2d", "3d_fullres"}
    full, flat = plans.configurations["3d_fullres"], plans.configurations["2d"]
    assert (full.patch_size, full.batch_size, full.topology.n_stages) == ((40, 56, 40), 9, 4)
    assert full.topology.features_per_stage == (32, 64, 128, 256)
    assert (flat.patch_size, flat.batch_size, flat.topology.n_stages) == ((56, 40), 366, 4)
    assert not full.batch_dice and flat.batch_dice


def test_abdominal_ct_like() -> None:
    plans = plan(*abdominal_ct())
    assert list(plans.configurations) == ["2d", "3d_fullres", "3d_lowres", "3d_cascade_fullres"]
    full = plans.configurations["3d_fullres"]
    assert full.spacing == pytest.approx((2.5, 0.79, 0.79))
    assert (full.patch_size, full.batch_size, full.topology.n_stages) == ((64, 160, 192), 2, 6)
    assert full.topology.kernel_sizes[:2] == ((1, 3, 3), (3, 3, 3))
    assert full.topology.strides[1:] == ((1, 2, 2),) + ((2, 2, 2),) * 4
    low = plans.configurations["3d_lowres"]
    assert low.spacing == pytest.approx((2.90, 1.47, 1.47), abs=0.005)
    assert (low.patch_size, low.batch_size, low.topology.n_stages) == ((96, 160, 160), 2, 6)
    cascade = plans.configurations["3d_cascade_fullres"]
    assert (full.batch_dice, low.batch_dice) == (True, False)
    assert (low.next_stage, cascade.previous_stage) == ("3d_cascade_fullres", "3d_lowres")
    assert cascade.data_id == full.data_id == "autoseg_3d_fullres"
    assert cascade.parameter_count == full.parameter_count + 2 * 32 * 9  # 2 one-hot label inputs, 1x3x3
    flat = plans.configurations["2d"]
    assert (flat.patch_size, flat.batch_size, flat.topology.n_stages) == ((512, 512), 12, 8)
    assert flat.normalization == ("ct",)


def test_acdc_like() -> None:
    plans = plan(*acdc())
    full, flat = plans.configurations["3d_fullres"], plans.configurations["2d"]
    assert full.spacing == pytest.approx((5.0, 1.55, 1.55))  # 10th percentile, not the 10 mm median
    assert (full.patch_size, full.batch_size, full.topology.n_stages) == ((20, 256, 224), 4, 6)
    assert full.topology.strides[1:] == ((1, 2, 2), (2, 2, 2), (2, 2, 2), (1, 2, 2), (1, 2, 2))
    assert "3d_lowres" not in plans.configurations
    # nnU-Net: 56. Our estimate counts parameters, which nnU-Net ignores; this small 2D net gains one.
    assert flat.patch_size == (256, 224) and flat.batch_size in (56, 57)


def test_heart_like() -> None:
    plans = plan(*heart())
    full, flat = plans.configurations["3d_fullres"], plans.configurations["2d"]
    assert (full.patch_size, full.batch_size, full.topology.n_stages) == ((64, 224, 160), 2, 6)
    assert full.topology.strides[1:] == ((2, 2, 2),) * 4 + ((1, 2, 2),)
    assert (flat.patch_size, flat.batch_size, flat.topology.n_stages) == ((384, 256), 33, 7)
    assert "3d_lowres" not in plans.configurations  # patch covers 26 % of the median image


def test_rgb_2d_only(caplog: pytest.LogCaptureFixture) -> None:
    channels = ("R", "G", "B")
    with caplog.at_level(logging.WARNING, logger="autoseg.planning"):
        plans = plan(fingerprint([((999.0, 1.0, 1.0), (1, 512, 512))] * 100, channels), dataset(100, channels, 1))
    assert list(plans.configurations) == ["2d"]
    flat = plans.configurations["2d"]
    assert (flat.patch_size, flat.batch_size, flat.topology.n_stages) == ((512, 512), 5, 8)  # 5 % cap
    assert flat.normalization == ("zscore",) * 3
    assert sum("'R'" in r.message or "'G'" in r.message or "'B'" in r.message for r in caplog.records) == 3


def test_lowres_dropped_when_reduction_is_small() -> None:
    """The fullres patch covers < 25 % but 25 % is reached after a few 3 % steps: not worth a cascade."""
    plans = plan(fingerprint([((1.37, 1.25, 1.25), (116, 354, 232))] * 20), dataset(20, labels=1))
    full = plans.configurations["3d_fullres"]
    assert math.prod(full.patch_size) / math.prod(full.median_shape) < 0.25
    assert "3d_lowres" not in plans.configurations and not full.batch_dice


# --- spacing and axis order ---------------------------------------------------------------------

def test_anisotropy_needs_both_conditions() -> None:
    coarse_few = [((10.0, 1.0, 1.0), (20, 200, 200))] * 8 + [((4.0, 1.0, 1.0), (50, 200, 200))] * 2
    assert target_spacing(*zip(*coarse_few)) == pytest.approx((4.0, 1.0, 1.0))  # 10th percentile
    coarse_many = [((10.0, 1.0, 1.0), (80, 200, 200))] * 8 + [((4.0, 1.0, 1.0), (200, 200, 200))] * 2
    assert target_spacing(*zip(*coarse_many)) == pytest.approx((10.0, 1.0, 1.0))  # median: many slices
    mild = [((2.5, 1.0, 1.0), (20, 200, 200))] * 8 + [((1.0, 1.0, 1.0), (50, 200, 200))] * 2
    assert target_spacing(*zip(*mild)) == pytest.approx((2.5, 1.0, 1.0))  # ratio < 3: median


def test_anisotropic_10th_percentile_interpolates_and_clamps() -> None:
    cases = [((z, 1.0, 1.0), (10, 200, 200)) for z in (2.0, 4.0) + (6.0,) * 8]
    assert target_spacing(*zip(*cases))[0] == pytest.approx(3.8)  # linear: 2 + 0.9 x (4 - 2)
    clamp = [((0.5, 1.5, 1.0), (10, 200, 200))] * 2 + [((6.0, 1.5, 1.0), (10, 200, 200))] * 8
    assert target_spacing(*zip(*clamp))[0] == pytest.approx(1.5 + 1e-5)  # stays the coarsest axis


def test_transpose_puts_coarsest_axis_first() -> None:
    assert transpose_for((1.0, 1.0, 1.0)) == ((0, 1, 2), (0, 1, 2))
    forward, backward = transpose_for((0.8, 0.8, 3.0))
    assert forward == (2, 0, 1) and backward == (1, 2, 0)
    assert tuple(forward[i] for i in backward) == (0, 1, 2)
    plans = plan(fingerprint([((0.8, 0.8, 3.0), (300, 300, 60))] * 4), dataset(4))
    assert plans.transpose_forward == (2, 0, 1)
    assert plans.configurations["3d_fullres"].spacing == pytest.approx((3.0, 0.8, 0.8))
    assert plans.original_median_shape == (60, 300, 300)


# --- topology -------------------------------------------------------------------------------------

def test_kernels_stay_1_until_spacing_within_2x() -> None:
    pooling = pooling_plan((4.0, 1.0, 1.0), (32, 256, 256))
    assert pooling.kernels[:3] == ((1, 3, 3), (1, 3, 3), (3, 3, 3))
    assert pooling.strides[1:4] == ((1, 2, 2), (1, 2, 2), (2, 2, 2))
    assert pooling.kernels[-1] == (3, 3, 3)


def test_single_axis_needs_12_voxels() -> None:
    assert pooling_plan((1.0, 1.0), (4, 64)).strides == ((1, 1), (1, 2), (1, 2), (1, 2))  # 64, 32, 16; not 8
    assert len(pooling_plan((1.0, 1.0), (4, 8)).strides) == 1
    assert len(pooling_plan((1.0, 1.0), (8, 8)).strides) == 2  # two axes: 8 is enough


@given(st.tuples(*(st.integers(1, 300),) * 3), st.tuples(*(st.floats(0.2, 8.0),) * 3))
@settings(max_examples=60, deadline=None)
def test_bottleneck_edge_and_divisibility(patch: tuple[int, ...], spacing: tuple[float, ...]) -> None:
    pooling = pooling_plan(spacing, patch)
    for axis, factor in enumerate(pooling.divisor):
        assert pooling.patch[axis] % factor == 0 and pooling.patch[axis] >= patch[axis]
        if factor > 1:
            assert math.ceil(patch[axis] / factor) >= MIN_FEATURE_MAP_EDGE


# --- properties over random fingerprints ------------------------------------------------------------

@st.composite
def random_dataset(draw: st.DrawFn) -> tuple[Fingerprint, Dataset]:
    n = draw(st.integers(1, 5))
    z_spacing = draw(st.floats(0.3, 8.0))
    xy_spacing = draw(st.floats(0.3, 2.0))
    cases = []
    for _ in range(n):
        jitter = draw(st.floats(0.8, 1.25))
        shape = (draw(st.integers(1, 220)), draw(st.integers(16, 400)), draw(st.integers(16, 400)))
        cases.append(((z_spacing * jitter, xy_spacing, xy_spacing * jitter), shape))
    channels = draw(st.sampled_from([("CT",), ("T2", "ADC")]))
    return fingerprint(cases, channels), dataset(draw(st.integers(1, 400)), channels, draw(st.integers(1, 5)))


@given(random_dataset(), st.floats(4.0, 48.0))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_every_configuration_is_consistent(data: tuple[Fingerprint, Dataset], budget: float) -> None:
    plans = plan(*data, memory_budget_gb=budget)
    for config in plans.configurations.values():
        total = config.topology.total_stride
        assert all(p % t == 0 for p, t in zip(config.patch_size, total)), config.name
        assert config.batch_size >= 2
        sizes = {"in_channels": len(plans.channel_names), "num_classes": plans.num_classes}
        assert estimate_memory_gb(config.topology, config.patch_size, 2, **sizes) <= budget
        assert len(config.spacing) == len(config.patch_size) == len(config.receptive_field) == config.dim


@given(random_dataset(), st.floats(4.0, 40.0), st.floats(1.05, 3.0))
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_more_memory_never_shrinks_the_patch(data: tuple[Fingerprint, Dataset], budget: float, more: float) -> None:
    """A bigger budget stops the shrinking earlier: patch >= per axis, and at the same patch the batch
    is >= too. (A bigger patch may come with a smaller batch: nnU-Net prefers patch over batch.)"""
    small, large = plan(*data, memory_budget_gb=budget), plan(*data, memory_budget_gb=budget * more)
    for name in ("2d", "3d_fullres"):
        if name not in small.configurations:
            continue
        a, b = small.configurations[name], large.configurations[name]
        assert all(pb >= pa for pa, pb in zip(a.patch_size, b.patch_size)), name
        if a.patch_size == b.patch_size:
            assert b.batch_size >= a.batch_size, name


# --- contract, normalisation, errors, summary ----------------------------------------------------------

def test_plans_json_round_trip(tmp_path: Path) -> None:
    plans = plan(*abdominal_ct())
    save_contract(tmp_path / "plans.json", plans)
    assert load_contract(tmp_path / "plans.json", Plans, rerun="autoseg plan") == plans


def test_normalization_names(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="autoseg.planning"):
        assert normalization_schemes(["CT", "noNorm", "zscore", "rescale_to_0_1", "RGB_to_0_1", "T2"]) == (
            "ct", "none", "zscore", "rescale01", "rgb01", "zscore")
        assert not caplog.records
        assert normalization_scheme("C T") == "zscore"
    assert "'C T'" in caplog.text and "did you mean 'ct'" in caplog.text


def test_mask_for_norm_only_for_zscore_after_a_big_crop() -> None:
    assert use_mask_for_norm(("zscore", "ct"), 0.6) == (True, False)
    assert use_mask_for_norm(("zscore", "ct"), 0.75) == (False, False)
    fp, ds = hippocampus(20)
    assert plan(dataclasses.replace(fp, median_relative_size_after_crop=0.5), ds).configurations[
        "3d_fullres"].use_mask_for_norm == (True,)


def test_impossible_input_raises_plan_error() -> None:
    fp, ds = heart()
    with pytest.raises(PlanError, match="memory budget") as err:
        plan(fp, ds, memory_budget_gb=0.5)  # below the fixed overhead
    assert "at least" in err.value.hint
    with pytest.raises(PlanError, match="no cases"):
        plan(dataclasses.replace(fp, cases=()), ds)
    with pytest.raises(PlanError, match="channels"):
        plan(fp, dataclasses.replace(ds, channel_names=("T1", "T2")))
    with pytest.raises(PlanError, match="positive"):
        plan(fp, ds, memory_budget_gb=-1.0)
    with pytest.raises(PlanError, match="too small"):
        plan(fingerprint([((1.0, 1.0, 1.0), (5, 5, 5))]), dataset(1))


def test_summarize_rows_and_notes() -> None:
    plans = plan(*hippocampus())
    rows = summarize(plans)
    assert [row["name"] for row in rows] == ["2d", "3d_fullres"]
    full = rows[1]
    assert (full["patch"], full["batch"], full["stages"], full["features"]) == ((40, 56, 40), 9, 4, "32-64-128-256")
    assert full["receptive_field"] == (75, 75, 75) and full["receptive_field_mm"] == (75.0, 75.0, 75.0)
    assert full["first_kernel"] == (3, 3, 3) and full["first_stride"] == (2, 2, 2)
    assert 0 < full["memory_gib"] <= 8 and full["params_m"] == pytest.approx(5.6, abs=0.01)
    assert any("5% of the dataset" in note for note in full["notes"])
    narrow = dataclasses.replace(plans.configurations["3d_fullres"], receptive_field=(75, 20, 75))
    rows = summarize(dataclasses.replace(plans, configurations={"3d_fullres": narrow}))
    assert any("smaller than half the patch" in note and "axis 1" in note for note in rows[0]["notes"])


@pytest.mark.realdata
def test_real_hippocampus(real_dataset: Path) -> None:
    """nnU-Net on these 195 cases: 3d_fullres 40x56x40, batch 7, 4 stages; 2d 56x40, batch 274."""
    extract = pytest.importorskip("autoseg.fingerprint").__dict__.get("extract_fingerprint")
    if extract is None:
        pytest.skip("autoseg.fingerprint.extract_fingerprint is not there yet")
    from autoseg.dataset.load import load_dataset

    ds = load_dataset(real_dataset)
    plans = plan(extract(ds, workers=2), ds)
    assert set(plans.configurations) == {"2d", "3d_fullres"}
    full, flat = plans.configurations["3d_fullres"], plans.configurations["2d"]
    assert (full.patch_size, full.batch_size, full.topology.n_stages) == ((40, 56, 40), 7, 4)
    assert (flat.patch_size, flat.batch_size) == ((56, 40), 274)


def test_a_family_heavier_per_voxel_is_told_its_patch_is_smaller_than_the_unets() -> None:
    """The planner shrinks every family's patch under the same budget; when it ends below the U-Net's, the
    configuration says so (how much context the family gives up), and only then."""
    unet = plan(*abdominal_ct()).configurations["3d_fullres"]
    for network in ("vnet", "resenc", "enet"):
        config = plan(*abdominal_ct(), network=network).configurations["3d_fullres"]
        notes = [note for note in config.notes if "U-Net's" in note]
        if math.prod(config.patch_size) < math.prod(unet.patch_size):
            shape = "x".join(map(str, unet.patch_size))
            assert len(notes) == 1 and shape in notes[0] and network in notes[0], (network, config.notes)
        else:
            assert notes == [], network
    assert not any("U-Net's" in note for note in unet.notes)
    vnet = plan(*abdominal_ct(), network="vnet").configurations["3d_fullres"]
    assert math.prod(vnet.patch_size) < math.prod(unet.patch_size)  # the case above is exercised


def test_every_planned_configuration_is_within_the_sanity_bounds_and_absurd_values_are_named() -> None:
    """Issue 19 S3: what a plans file from elsewhere must respect; nothing the planner writes comes near."""
    from autoseg.model.families import NETWORKS
    from autoseg.planning.sanity import plans_problems

    for fingerprint in (hippocampus, abdominal_ct):
        for network in ("unet", "fullnet", "refinenet", "enet"):
            assert plans_problems(plan(*fingerprint(), network=network)) == [], network
    assert "unet" in NETWORKS
    plans = plan(*hippocampus())
    config = plans.configurations["3d_fullres"]
    absurd = dataclasses.replace(config, patch_size=(100000,) * 3, spacing=(1e-4, 1.0, 1.0),
                                 topology=dataclasses.replace(config.topology, features_per_stage=(100000,) * 4))
    problems = plans_problems(dataclasses.replace(plans, configurations={"3d_fullres": absurd},
                                                  transpose_forward=(0, 0, 1)))
    text = "; ".join(problems)
    assert len(problems) == 4 and "patch (100000, 100000, 100000)" in text and "spacing (0.0001" in text
    assert "features (100000" in text and "transpose_forward (0, 0, 1)" in text
