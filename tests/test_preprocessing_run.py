"""Preprocessing a dataset: cache contents, the exact inverse, resuming after interruption."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from autoseg.dataset.load import load_dataset
from autoseg.fingerprint import extract_fingerprint
from autoseg.io import read_label
from autoseg.planning import plan
from autoseg.preprocessing import run as run_module
from autoseg.preprocessing.cache import case_files, read_case
from autoseg.preprocessing.contract import CaseProperties
from autoseg.preprocessing.crop import OUTSIDE
from autoseg.preprocessing.inverse import restore_label, restore_probabilities
from autoseg.preprocessing.run import preprocess_dataset
from autoseg.runtime.lock import LOCK_NAME
from autoseg.runtime.parts import Part
from autoseg.serialization import load_contract, save_contract


def _prepared(raw: Path, out: Path, names: list[str], workers: int = 1):
    dataset = load_dataset(raw)
    plans = plan(extract_fingerprint(dataset), dataset)
    folders = preprocess_dataset(dataset, plans, names, out_root=out, workers=workers)
    return dataset, plans, folders


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1)


def _files(folder: Path) -> list[Path]:
    """The cache's files, without the lock files every run rewrites (autoseg.runtime.lock)."""
    return sorted(p for p in folder.iterdir() if p.name != LOCK_NAME and not p.name.startswith(".autoseg.part"))


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in _files(folder)}


@pytest.fixture(scope="module")
def prepared(example_dataset: Path, tmp_path_factory: pytest.TempPathFactory):
    return _prepared(example_dataset, tmp_path_factory.mktemp("pre"), ["3d_fullres", "2d"])


def test_cache_holds_consistent_cases(prepared) -> None:
    dataset, plans, folders = prepared
    config = plans.configurations["3d_fullres"]
    for case in dataset.cases:
        data, seg, props, locations = read_case(folders["3d_fullres"], case.case_id)
        assert isinstance(data, np.memmap) and data.dtype == np.float32
        assert data.shape == (1, *seg.shape) and seg.shape == props.shape
        assert props.spacing == pytest.approx(config.spacing)
        assert set(np.unique(seg)) <= {OUTSIDE, 0, 1, 2}
        assert props.classes == (1, 2)
        for key, coords in locations.items():
            assert len(coords) and np.all(seg[tuple(coords.T)] == key)


def test_two_d_keeps_the_through_plane_spacing(prepared) -> None:
    dataset, plans, folders = prepared
    _, seg, props, _ = read_case(folders["2d"], dataset.cases[0].case_id)
    assert props.spacing[0] == pytest.approx(props.spacing_before_resample[0])
    assert seg.shape[0] == props.shape_after_crop[0]


def test_label_round_trip_is_exact_in_geometry_and_close_in_content(prepared) -> None:
    dataset, plans, folders = prepared
    config = plans.configurations["3d_fullres"]
    for case in dataset.cases:
        _, seg, props, _ = read_case(folders["3d_fullres"], case.case_id)
        original, geometry = read_label(case.label)
        restored = restore_label(np.asarray(seg), props, plans=plans, config=config)
        assert restored.shape == original.shape and props.geometry == geometry
        for value in (1, 2):
            # resampling there and back blurs borders: a lesion of a few dozen voxels loses more
            expected = 0.95 if (original == value).sum() >= 500 else 0.75
            assert _dice(restored == value, original == value) >= expected


def test_probability_round_trip_sums_to_one(prepared) -> None:
    dataset, plans, folders = prepared
    config = plans.configurations["3d_fullres"]
    _, seg, props, _ = read_case(folders["3d_fullres"], dataset.cases[0].case_id)
    onehot = np.stack([(np.asarray(seg) == k) for k in range(3)]).astype(np.float32)
    onehot[0] += np.asarray(seg) == OUTSIDE
    probs = restore_probabilities(onehot, props, plans=plans, config=config)
    original, _ = read_label(dataset.cases[0].label)
    assert probs.shape == (3, *original.shape)
    assert np.allclose(probs.sum(0), 1.0, atol=1e-5)
    assert _dice(probs.argmax(0) == 1, original == 1) >= 0.9


def test_rerun_skips_finished_cases_and_overwrite_redoes_them(prepared) -> None:
    dataset, plans, folders = prepared
    folder = folders["3d_fullres"]
    stamps = {p: p.stat().st_mtime_ns for p in _files(folder)}
    preprocess_dataset(dataset, plans, ["3d_fullres"], out_root=folder.parent)
    assert {p: p.stat().st_mtime_ns for p in _files(folder)} == stamps
    preprocess_dataset(dataset, plans, ["3d_fullres"], out_root=folder.parent, overwrite=True)
    assert any(p.stat().st_mtime_ns != stamps[p] for p in _files(folder))


def test_cache_is_shared_between_networks_and_kept_from_before_families(prepared) -> None:
    """The case hash covers what shapes the arrays, not the network: resenc's plans find the U-Net's cases
    done; a case stamped with the hash of before network families (the whole configuration) is done too."""
    dataset, plans, folders = prepared
    config = plans.configurations["3d_fullres"]
    resenc = plan(extract_fingerprint(dataset), dataset, network="resenc")
    other = resenc.configurations["3d_fullres"]
    assert other.data_id == config.data_id and other.topology != config.topology
    folder = folders["3d_fullres"]
    assert run_module._pending_jobs(dataset, dataset.cases, resenc, other, folder, overwrite=False) == []
    case = dataset.cases[0]
    properties_file = case_files(folder, case.case_id)["properties"]
    original = load_contract(properties_file, CaseProperties, rerun="-")
    legacy = run_module.case_hash(case, plans, config, legacy=True)
    assert legacy != run_module.case_hash(case, plans, config) == run_module.case_hash(case, resenc, other)
    try:
        for stamp, pending in ((legacy, 0), ("stale", 1)):
            save_contract(properties_file, dataclasses.replace(original, source_hash=stamp))
            pending_jobs = run_module._pending_jobs(dataset, dataset.cases, plans, config, folder, overwrite=False)
            assert len(pending_jobs) == pending
    finally:
        save_contract(properties_file, original)


def test_interrupted_write_is_redone_and_result_equals_uninterrupted(
    example_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dataset, plans, reference = _prepared(example_dataset, tmp_path / "ref", ["3d_fullres"])
    real_write, calls = run_module.write_case, []

    def dying_write(folder, properties, *, data, seg, locations):
        calls.append(properties.case_id)
        if len(calls) == 3:  # the third case dies after its data file, before its properties
            np.save(case_files(folder, properties.case_id)["data"], data)
            raise KeyboardInterrupt
        real_write(folder, properties, data=data, seg=seg, locations=locations)

    monkeypatch.setattr(run_module, "write_case", dying_write)
    with pytest.raises(KeyboardInterrupt):
        preprocess_dataset(dataset, plans, ["3d_fullres"], out_root=tmp_path / "cut")
    monkeypatch.setattr(run_module, "write_case", real_write)
    preprocess_dataset(dataset, plans, ["3d_fullres"], out_root=tmp_path / "cut")
    folder = reference["3d_fullres"]
    assert _digest(tmp_path / "cut" / folder.name) == _digest(folder)


def test_parts_together_write_the_whole_cache_and_clean_only_their_own_leftovers(
        example_dataset: Path, tmp_path: Path, prepared) -> None:
    dataset, plans, folders = prepared
    whole = folders["3d_fullres"]
    folder = tmp_path / whole.name
    folder.mkdir()
    ids = sorted(case.case_id for case in dataset.cases)
    stray = {case_id: folder / f".{case_id}.npy.killed.tmp" for case_id in ids}  # a killed run's leftovers
    for path in stray.values():
        path.write_bytes(b"")
    count = 2
    for index in range(1, count + 1):
        preprocess_dataset(dataset, plans, ["3d_fullres"], out_root=tmp_path, part=Part(index, count))
        done = {p.name[: -len(".json")] for p in folder.glob("*.json")}
        assert done == {case_id for k, case_id in enumerate(ids) if k % count < index}
        assert {case_id for case_id, path in stray.items() if path.exists()} == set(ids) - done
    assert _digest(folder) == _digest(whole)


@pytest.mark.slow
def test_killed_process_resumes_to_the_same_files(tmp_path: Path) -> None:
    from autoseg.dataset.synthetic import make_example_dataset

    raw = make_example_dataset(tmp_path / "raw" / "Dataset950_Kill", n_cases=10, size=40, seed=3)
    env = dict(os.environ, AUTOSEG_RAW=str(tmp_path / "raw"), AUTOSEG_PREPROCESSED=str(tmp_path / "pre"))
    cli = [sys.executable, "-m", "autoseg"]
    subprocess.run([*cli, "plan", "950", "-j", "1"], env=env, check=True, capture_output=True)
    folder = tmp_path / "pre" / "Dataset950_Kill" / "autoseg_3d_fullres"
    process = subprocess.Popen([*cli, "preprocess", "950", "-j", "1"], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (folder.exists() and list(folder.glob("*.json"))):
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished = len(list(folder.glob("*.json")))
    subprocess.run([*cli, "preprocess", "950", "-j", "2"], env=env, check=True, capture_output=True)
    reference = tmp_path / "reference"
    shutil.copytree(raw.parent, tmp_path / "raw2")
    env2 = dict(env, AUTOSEG_RAW=str(tmp_path / "raw2"), AUTOSEG_PREPROCESSED=str(reference))
    subprocess.run([*cli, "plan", "950", "-j", "1"], env=env2, check=True, capture_output=True)
    subprocess.run([*cli, "preprocess", "950", "-j", "1"], env=env2, check=True, capture_output=True)
    resumed = {k: v for k, v in _digest(folder).items() if not k.endswith(".json")}
    fresh = {k: v for k, v in _digest(reference / "Dataset950_Kill" / folder.name).items()
             if not k.endswith(".json")}
    assert finished < 10 and resumed == fresh
    assert not [p for p in _files(folder) if p.name.startswith(".")]  # no temporary file left


@pytest.mark.realdata
def test_real_dataset_round_trip(real_dataset: Path, tmp_path: Path) -> None:
    dataset, plans, folders = _prepared(real_dataset, tmp_path, ["3d_fullres"], workers=2)
    config = plans.configurations["3d_fullres"]
    scores = []
    for case in dataset.cases[:40]:
        _, seg, props, _ = read_case(folders["3d_fullres"], case.case_id)
        original, _ = read_label(case.label)
        restored = restore_label(np.asarray(seg), props, plans=plans, config=config)
        assert restored.shape == original.shape
        scores += [_dice(restored == v, original == v) for v in (1, 2)]
    assert min(scores) >= 0.95
