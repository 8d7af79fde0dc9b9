"""The training loader: patch geometry, oversampling, label/image alignment, targets, workers, CPUs."""

from __future__ import annotations

import dataclasses
import gc
import math
import os
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autoseg.dataset.load import load_dataset
from autoseg.dataset.synthetic import make_example_dataset
from autoseg.errors import SettingsError
from autoseg.fingerprint import extract_fingerprint
from autoseg.planning import plan
from autoseg.planning.contract import Configuration
from autoseg.preprocessing.run import preprocess_dataset
from autoseg.runtime.processes import process_pool
from autoseg.training import (
    PRESETS,
    Augmentation,
    CacheMissingError,
    DataLoaderError,
    SpatialSettings,
    WorkerPool,
    allotted_cpus,
    crop_padded,
    deep_supervision_factors,
    default_workers,
    initial_patch_size,
    make_loader,
)
from autoseg.training.augment import (
    SpatialDraw,
    batch_transforms,
    downsample_target,
    initial_size,
    input_box,
    resample_sample,
    resolve,
    sample_points,
)

# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, list[str], Configuration]]:
    """The example dataset (3 cases of ~32^3) preprocessed for 3d_fullres and 2d by preprocess_dataset."""
    root = tmp_path_factory.mktemp("loader")
    dataset = load_dataset(make_example_dataset(root / "raw" / "Dataset901_Loader", n_cases=3, size=32, seed=3))
    plans = plan(extract_fingerprint(dataset, workers=1), dataset, memory_budget_gb=8.0)
    folders = preprocess_dataset(dataset, plans, ["3d_fullres", "2d"], out_root=root / "cache", workers=1)
    ids = [case.case_id for case in dataset.cases]
    return {name: (folders[name], ids, plans.configurations[name]) for name in folders}


@pytest.fixture(scope="module")
def coded_cache(cache: dict, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str], Configuration]:
    """A copy of the 3d cache whose image is a code of the label: 10**label inside, 0 outside (-1)."""
    folder, ids, config = cache["3d_fullres"]
    out = tmp_path_factory.mktemp("coded")
    for file in folder.iterdir():
        shutil.copy(file, out / file.name)
    for case_id in ids:
        seg = np.load(out / f"{case_id}_seg.npy")
        np.save(out / f"{case_id}.npy", code(seg)[None])
    return out, ids, config


def code(label: np.ndarray) -> np.ndarray:
    """10**label for labels >= 0, 0 for -1: a linear mix of different labels never hits another code."""
    return np.where(label >= 0, 10.0 ** np.maximum(label, 0), 0.0).astype(np.float32)


def decode(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(label the image unambiguously shows, where it does): a pure code means no labels were mixed."""
    label = np.full(image.shape, -9, np.int16)
    for value in (-1, 0, 1, 2, 3):
        target = 0.0 if value < 0 else 10.0 ** value
        label[np.abs(image - target) <= 1e-6 * max(target, 1.0)] = value
    return label, label != -9


if "test-geometry" not in PRESETS:
    @PRESETS.register("test-geometry")
    def _geometry(patch: tuple[int, ...]) -> Augmentation:
        """Every sample rotated and scaled, mirrored, no intensity changes: alignment is checkable."""
        spatial = SpatialSettings(rotation=math.pi / 6, p_rotation=1.0, p_scale=1.0)
        return Augmentation(spatial=spatial, mirror_axes=tuple(range(len(patch))), intensity=False)


# ---------------------------------------------------------------- patch geometry


def test_initial_patch_size_holds_every_rotation_and_scale() -> None:
    patch = (20, 28, 24)
    size = initial_patch_size(patch, rotation=math.pi / 6, scale_max=1.4)
    assert all(s >= p and (s - p) % 2 == 0 for s, p in zip(size, patch))
    settings = SpatialSettings(rotation=math.pi / 6, p_rotation=1.0, p_scale=1.0)
    augmentation = Augmentation(spatial=settings, mirror_axes=(), intensity=False)
    assert initial_size(augmentation, patch) == size
    rng = np.random.default_rng(0)
    for _ in range(30):
        angles = tuple(rng.uniform(-math.pi / 6, math.pi / 6, 3))
        _, box, _ = input_box(sample_points(patch, SpatialDraw(angles, 1.4)), (0, 0, 0), patch)
        assert all(b <= s for b, s in zip(box, size)), (box, size)
    assert initial_patch_size((56, 40), rotation=math.pi, scale_max=1.0) >= (69, 69)  # the diagonal
    assert initial_patch_size((8, 10), rotation=0.0, scale_max=1.0) == (10, 12)  # +1 neighbour, even margin


def test_crop_padded_pads_outside_and_reads_inside() -> None:
    array = np.arange(2 * 4 * 5, dtype=np.float32).reshape(2, 4, 5)
    out = crop_padded(array, (-1, 3), (3, 4), fill=-7.0)
    assert out.shape == (2, 3, 4)
    assert np.all(out[:, 0] == -7) and np.all(out[:, :, 2:] == -7)
    assert np.array_equal(out[:, 1:, :2], array[:, :2, 3:])
    assert np.all(crop_padded(array, (10, 10), (2, 2), fill=0) == 0)


@pytest.mark.parametrize("name", ["3d_fullres", "2d"])
def test_batch_shapes_dtypes_and_targets(cache: dict, name: str) -> None:
    folder, ids, config = cache[name]
    batch = next(make_loader(folder, ids, config, batch_size=3, workers=0))
    patch = tuple(config.patch_size)
    assert batch["data"].shape == (3, 1, *patch) and batch["data"].dtype == np.float32
    factors = deep_supervision_factors(config.topology.strides)
    assert len(batch["target"]) == config.topology.n_stages - 1 == len(factors)
    for target, factor in zip(batch["target"], factors):
        assert target.shape == (3, 1, *(p // f for p, f in zip(patch, factor)))
        assert target.dtype == np.uint8 and target.max() <= 2
    single = next(make_loader(folder, ids, config, batch_size=3, workers=0, deep_supervision=False))
    assert len(single["target"]) == 1 and np.array_equal(single["target"][0], batch["target"][0])


def test_deep_supervision_factors_and_downsampling() -> None:
    strides = ((1, 1, 1), (2, 2, 2), (2, 2, 1), (1, 2, 2))
    assert deep_supervision_factors(strides) == [(1, 1, 1), (2, 2, 2), (4, 4, 2)]
    seg = np.arange(8 * 8).reshape(1, 1, 8, 8)
    assert np.array_equal(downsample_target(seg, (2, 4))[0, 0], seg[0, 0, 1::2, 2::4])  # block centres


# ---------------------------------------------------------------- sampling


@pytest.mark.parametrize("name", ["3d_fullres", "2d"])
def test_oversampled_patches_hold_foreground(cache: dict, name: str) -> None:
    folder, ids, config = cache[name]
    loader = make_loader(folder, ids, config, batch_size=5, augmentation="none", workers=0, seed=1)
    for _ in range(6):
        batch = next(loader)
        assert batch["forced"].tolist() == [False, False, False, True, True]  # round(0.33 * 5) = 2, last ones
        for target in batch["target"][0][batch["forced"]]:
            assert target.max() > 0


def test_forced_count_rounds_half_up_like_nnunet() -> None:
    from autoseg.training.sampling import round_half_up

    assert [round_half_up(0.33 * b) for b in (1, 2, 5, 7, 12)] == [0, 1, 2, 2, 4]
    assert round_half_up(0.5 * 5) == 3  # nnU-Net: j >= round(5 * 0.5) = 2 -> 3 forced


def test_patch_larger_than_case_is_padded(cache: dict) -> None:
    folder, ids, config = cache["3d_fullres"]
    big = dataclasses.replace(config, patch_size=(48, 48, 48))
    batch = next(make_loader(folder, ids, big, batch_size=2, augmentation="none", workers=0, oversample=0.0))
    for data, case_id in zip(batch["data"], batch["case_ids"]):
        case = np.load(folder / f"{case_id}.npy")
        assert all(s < 48 for s in case.shape[1:])
        assert np.isclose(data.sum(), case.sum(), rtol=1e-4)  # the whole case is inside, the rest is 0
        assert (data == 0).sum() >= 48**3 - case[0].size


@settings(max_examples=80, deadline=None)
@given(extent=st.integers(1, 80), patch=st.integers(1, 80), seed=st.integers(0, 2**16))
def test_random_patch_lies_in_the_case_or_centres_a_small_case(extent: int, patch: int, seed: int) -> None:
    from autoseg.inference.tiling import padding_for
    from autoseg.training.sampling import random_lower

    rng = np.random.default_rng(seed)
    lowers = {random_lower(extent, patch, rng) for _ in range(40)}
    if extent >= patch:
        assert all(0 <= low <= extent - patch for low in lowers)
    else:  # the case sits mid-patch, as inference pads it; an odd gap puts the spare voxel either side
        gap = patch - extent
        assert lowers <= {-(gap // 2), -((gap + 1) // 2)}
        assert -padding_for((extent,), (patch,))[0][0] in {-(gap // 2), -((gap + 1) // 2)}


def test_same_seed_same_batches_and_any_worker_count(cache: dict) -> None:
    folder, ids, config = cache["3d_fullres"]
    state = np.random.get_state()

    def first(seed: int, workers: int, n: int = 3) -> list[dict]:
        with make_loader(folder, ids, config, workers=workers, seed=seed) as loader:
            return [next(loader) for _ in range(n)]

    a, b, c = first(5, 0), first(5, 0), first(6, 0)
    assert all(np.array_equal(x["data"], y["data"]) for x, y in zip(a, b))
    assert not np.array_equal(a[0]["data"], c[0]["data"])
    assert all(np.array_equal(x["data"], y["data"]) for x, y in zip(a, first(5, 2)))
    assert np.array_equal(np.random.get_state()[1], state[1])  # the caller's global state is untouched


# ---------------------------------------------------------------- alignment of label and image


@pytest.mark.parametrize("draw", [SpatialDraw((0.4, -0.3, 0.5), None), SpatialDraw(None, 0.72),
                                  SpatialDraw(None, 1.37), SpatialDraw((-0.5, 0.2, 0.1), 1.2)])
def test_spatial_step_keeps_label_and_image_aligned(draw: SpatialDraw) -> None:
    label = blocks((30, 34, 32))
    patch = (24, 28, 26)
    points = sample_points(patch, draw)
    lower, size, inside = input_box(points, (2, 3, 3), patch)
    settings = SpatialSettings(rotation=0.5)
    data, seg = resample_sample(code(crop_padded(label, lower, size, fill=-1))[None],
                                crop_padded(label, lower, size, fill=-1)[None], inside, settings=settings)
    shown, clear = decode(data[0])
    assert clear.mean() > 0.5 and np.array_equal(seg[0][clear], shown[clear])
    # reading a much larger box gives the same result: the exact box loses nothing
    far = tuple(low - 7 for low in lower)
    big = tuple(s + 14 for s in size)
    data2, seg2 = resample_sample(code(crop_padded(label, far, big, fill=-1))[None],
                                  crop_padded(label, far, big, fill=-1)[None], inside + 7, settings=settings)
    assert np.allclose(data, data2, atol=1e-5) and np.array_equal(seg, seg2)


def test_dummy_2d_resamples_each_slice_in_plane() -> None:
    label = blocks((6, 40, 40))
    settings = SpatialSettings(rotation=math.pi, dummy_2d=True)
    points = sample_points((30, 30), SpatialDraw((2.0,), 0.9))
    lower, size, inside = input_box(points, (5, 5), (30, 30))
    crop = crop_padded(label, (0, *lower), (6, *size), fill=-1)
    data, seg = resample_sample(code(crop)[None], crop[None], inside, settings=settings)
    assert data.shape == (1, 6, 30, 30) and seg.shape == (1, 6, 30, 30)
    shown, clear = decode(data[0])
    assert np.array_equal(seg[0][clear], shown[clear])
    for z in range(6):  # slice z only sees slice z
        single, _ = resample_sample(code(crop[z])[None], crop[z][None], inside, settings=settings)
        assert np.allclose(single[0], data[0, z])


def test_rotation_by_90_degrees_moves_a_marker_like_rot90() -> None:
    label = np.zeros((9, 9), np.int16)
    label[1, 6] = 2  # a marker off every axis of symmetry
    points = sample_points((9, 9), SpatialDraw((math.pi / 2,), None))
    lower, size, inside = input_box(points, (0, 0), (9, 9))
    crop = crop_padded(label, lower, size, fill=-1)
    data, seg = resample_sample(code(crop)[None], crop[None], inside, settings=SpatialSettings(rotation=math.pi))
    matches = [k for k in (1, 3) if np.array_equal(seg[0], np.rot90(label, k))]
    assert len(matches) == 1 and np.allclose(data[0], code(np.rot90(label, matches[0])), atol=1e-4)


def test_mirroring_flips_image_and_label_together() -> None:
    rng = np.random.default_rng(0)
    seg = rng.integers(0, 4, (6, 1, 5, 7, 9)).astype(np.int16)
    batch = {"data": code(seg).astype(np.float32), "seg": seg.copy()}
    mirrored = {"data": batch["data"].copy(), "seg": seg.copy()}
    np.random.seed(0)
    for transform in batch_transforms(Augmentation(spatial=None, mirror_axes=(0, 1, 2), intensity=False)):
        mirrored = transform(**mirrored)
    assert not np.array_equal(mirrored["seg"], seg)  # something was flipped
    assert np.array_equal(decode(mirrored["data"])[0], mirrored["seg"])


@pytest.mark.parametrize("position", range(7))
def test_intensity_transforms_leave_the_label_and_the_content_in_place(position: int) -> None:
    """Each intensity transform of the default preset, forced on, neither touches the label nor moves
    the image content (a blob's bright-half centroid stays within a voxel)."""
    transform = batch_transforms(resolve("default", (20, 24, 18)))[position]
    for name in ("p_per_sample", "p_per_channel"):
        if hasattr(transform, name):
            setattr(transform, name, 1.0)
    grid = np.indices((20, 24, 18))
    blob = np.exp(-((grid[0] - 10) ** 2 + (grid[1] - 12) ** 2 + (grid[2] - 8) ** 2) / 18.0)
    data = np.repeat((4 * blob - 1)[None, None], 3, axis=0).astype(np.float32)
    seg = (blob > 0.5).astype(np.int16)[None, None].repeat(3, axis=0)
    np.random.seed(position)
    out = transform(data=data.copy(), seg=seg.copy())
    assert np.array_equal(out["seg"], seg)
    for image in out["data"][:, 0]:
        bright = image >= (image.max() + image.min()) / 2
        assert np.allclose([g[bright].mean() for g in grid], (10, 12, 8), atol=1.0)


def test_whole_pipeline_keeps_alignment(coded_cache: tuple) -> None:
    folder, ids, config = coded_cache
    loader = make_loader(folder, ids, config, batch_size=4, augmentation="test-geometry", workers=0, seed=2)
    for _ in range(3):
        batch = next(loader)
        shown, clear = decode(batch["data"][:, 0])
        shown[shown < 0] = 0  # the target has -1 (outside) mapped to background
        assert clear.mean() > 0.5
        assert np.array_equal(batch["target"][0][:, 0][clear], shown[clear])


def test_default_preset_runs_for_an_anisotropic_patch(cache: dict) -> None:
    folder, ids, config = cache["3d_fullres"]
    flat = dataclasses.replace(config, patch_size=(4, 24, 32))
    assert resolve("default", flat.patch_size).spatial.dummy_2d
    batch = next(make_loader(folder, ids, flat, batch_size=6, workers=0, deep_supervision=False))
    assert batch["data"].shape == (6, 1, 4, 24, 32)


def test_unknown_preset_and_missing_case_are_user_errors(cache: dict) -> None:
    folder, ids, config = cache["3d_fullres"]
    with pytest.raises(SettingsError, match="did you mean 'default'"):
        make_loader(folder, ids, config, augmentation="defualt", workers=0)
    with pytest.raises(CacheMissingError, match="autoseg preprocess"):
        make_loader(folder, [*ids, "case_999"], config, workers=0)


def blocks(shape: tuple[int, ...]) -> np.ndarray:
    """Labels -1..3 in large blocks (so most output voxels are unambiguous), -1 along the border."""
    grid = np.indices(shape)
    label = ((grid[-1] // 7 + grid[-2] // 9 + (grid[0] // 5 if len(shape) == 3 else 0)) % 4).astype(np.int16)
    label[tuple(slice(0, 2) for _ in shape)] = -1
    return label


# ---------------------------------------------------------------- CPUs


def test_allotted_cpus_takes_the_tightest_source(tmp_path: Path) -> None:
    (tmp_path / "job").mkdir()
    (tmp_path / "cpu.max").write_text("max 100000\n")
    (tmp_path / "job" / "cpu.max").write_text("250000 100000\n")
    v2 = "0::/job\n"
    assert allotted_cpus(affinity=16, cgroup_root=tmp_path, self_cgroup=v2, environ={}) == 3  # ceil(2.5)
    assert allotted_cpus(affinity=2, cgroup_root=tmp_path, self_cgroup=v2, environ={}) == 2
    slurm = {"SLURM_CPUS_PER_TASK": "1"}
    assert allotted_cpus(affinity=16, cgroup_root=tmp_path, self_cgroup=v2, environ=slurm) == 1
    empty = tmp_path / "nothing"
    assert allotted_cpus(affinity=8, cgroup_root=empty, self_cgroup="", environ={"SLURM_CPUS_PER_TASK": "x"}) == 8


def test_allotted_cpus_reads_cgroup_v1(tmp_path: Path) -> None:
    folder = tmp_path / "cpu,cpuacct" / "slurm"
    folder.mkdir(parents=True)
    (folder / "cpu.cfs_quota_us").write_text("400000")
    (folder / "cpu.cfs_period_us").write_text("100000")
    v1 = "5:cpu,cpuacct:/slurm\n3:memory:/slurm\n"
    assert allotted_cpus(affinity=64, cgroup_root=tmp_path, self_cgroup=v1, environ={}) == 4
    (folder / "cpu.cfs_quota_us").write_text("-1")  # unlimited
    assert allotted_cpus(affinity=64, cgroup_root=tmp_path, self_cgroup=v1, environ={}) == 64
    assert allotted_cpus() >= 1
    assert [default_workers(n, ranks=1) for n in (1, 2, 3, 8, 100)] == [1, 2, 2, 7, 32]
    assert [default_workers(n, ranks=4) for n in (2, 8, 32, 200)] == [1, 2, 7, 32]  # CPUs shared by GPU ranks


def test_default_workers_share_the_cpus_among_torchrun_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert default_workers(8) == 3
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert default_workers(8) == 7


# ---------------------------------------------------------------- workers


def _fail_at_three(index: int) -> int:
    if index == 3:
        raise ValueError("bad case 3")
    return index


def _exit_at_two(index: int) -> int:
    if index == 2:
        os._exit(7)
    return index


def test_worker_exception_is_reported_with_its_traceback() -> None:
    with WorkerPool(_fail_at_three, workers=2) as pool:
        assert [pool.get() for _ in range(3)] == [0, 1, 2]
        with pytest.raises(DataLoaderError, match=r"failed while making batch 3: ValueError: bad case 3") as info:
            pool.get()
    assert "_fail_at_three" in str(info.value)


def test_worker_exit_code_is_reported() -> None:
    with WorkerPool(_exit_at_two, workers=2) as pool, pytest.raises(DataLoaderError, match="exited .* code 7"):
        for _ in range(5):
            pool.get()


def test_killed_worker_gives_a_clear_error_quickly(cache: dict) -> None:
    folder, ids, config = cache["3d_fullres"]
    loader = make_loader(folder, ids, config, workers=2)
    next(loader)
    pids = loader.worker_pids
    os.kill(pids[1], signal.SIGKILL)
    started = time.monotonic()
    with pytest.raises(DataLoaderError, match=r"worker 1 .* signal 9 \(SIGKILL\)") as info:
        for _ in range(20):
            next(loader)
    assert time.monotonic() - started < 10
    assert "out-of-memory" in info.value.hint and "--workers" in info.value.hint
    time.sleep(0.2)
    assert not any(_alive(pid) for pid in pids)  # the other worker was stopped too


def test_workers_outlive_a_schedulers_stop_signal_and_still_close(cache: dict) -> None:
    folder, ids, config = cache["3d_fullres"]
    loader = make_loader(folder, ids, config, workers=2)
    next(loader)
    pids = loader.worker_pids
    for pid in pids:  # SLURM signals every process of the job; the main one finishes its epoch first
        os.kill(pid, signal.SIGTERM)
        os.kill(pid, signal.SIGUSR1)
    for _ in range(6):
        next(loader)
    assert all(_alive(pid) for pid in pids)
    loader.close()
    time.sleep(0.2)
    assert not any(_alive(pid) for pid in pids)


class _CycleWithFinalizer:
    """Garbage in a reference cycle whose finalizer records which process ran it."""

    def __init__(self, record: Path) -> None:
        self.record, self.me = record, self

    def __del__(self) -> None:
        (self.record / str(os.getpid())).touch()


def _collect_then_echo(index: int) -> int:
    gc.collect()  # what an import or allocation in a worker may trigger at any time
    return index


@pytest.mark.parametrize("kind", ["loader workers", "process pool"])
def test_workers_never_finalize_the_parents_garbage(tmp_path: Path, kind: str) -> None:
    gc.disable()  # keep the cycle uncollected in the parent until the workers exist
    try:
        _CycleWithFinalizer(tmp_path)
        if kind == "loader workers":
            with WorkerPool(_collect_then_echo, workers=2) as pool:
                assert [pool.get() for _ in range(4)] == [0, 1, 2, 3]
        else:  # what check, fingerprint, preprocess and evaluate use
            with process_pool(2) as executor:
                assert list(executor.map(_collect_then_echo, range(4))) == [0, 1, 2, 3]
    finally:
        gc.enable()
    gc.collect()
    assert [p.name for p in tmp_path.iterdir()] == [str(os.getpid())]  # finalized once, by the parent


def test_transform_raising_in_a_worker_is_reported(cache: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    import autoseg.training.data as data_module

    def broken(seg: np.ndarray, factor: tuple[int, ...]) -> np.ndarray:
        raise ValueError("this transform is broken")

    monkeypatch.setattr(data_module, "downsample_target", broken)  # inherited by the forked workers
    folder, ids, config = cache["3d_fullres"]
    started = time.monotonic()
    with make_loader(folder, ids, config, workers=2) as loader, pytest.raises(
            DataLoaderError, match=r"worker 0 failed while making batch 0: ValueError: this transform is broken"):
        next(loader)
    assert time.monotonic() - started < 10


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")
    return not (status.is_file() and "zombie" in status.read_text())
