"""The synthetic example dataset and the integrity check (every fault named, nothing modified)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from autoseg.dataset import Problem, check_dataset, load_dataset, make_example_dataset
from autoseg.dataset.check import compare_geometry
from autoseg.dataset.synthetic import synthesize_case
from autoseg.errors import DatasetError, SettingsError
from autoseg.io import Geometry, read_array, write_image

CASE = "case_000"


# --- the generator -----------------------------------------------------------------------------

def test_example_dataset_is_clean_and_loads(example_dataset: Path) -> None:
    assert check_dataset(example_dataset) == []
    dataset = load_dataset(example_dataset)
    assert dataset.channel_names == ("CT",)
    assert [(lab.name, lab.values) for lab in dataset.labels] == [
        ("background", (0,)), ("organ", (1,)), ("lesion", (2,))]
    assert dataset.file_ending == ".nii.gz" and dataset.num_training == 4
    assert sorted(p.name for p in (example_dataset / "imagesTs").iterdir()) == [
        "test_000_0000.nii.gz", "test_001_0000.nii.gz"]
    assert sorted(p.name for p in (example_dataset / "labelsTs").iterdir()) == ["test_000.nii.gz", "test_001.nii.gz"]


def test_example_cases_have_both_labels_and_scan_like_geometry(example_dataset: Path) -> None:
    for case in load_dataset(example_dataset).cases:
        image, geometry, _ = read_array(case.images[0])
        label, label_geometry, _ = read_array(case.label)
        assert label.dtype == np.uint8 and image.dtype == np.int16
        assert set(np.unique(label)) == {0, 1, 2}
        assert label_geometry == geometry
        sx, sy, sz = geometry.file_spacing
        assert sx == sy and 0.7 < sx < 0.9 and 1.25 < sz < 1.75
        assert all(abs(o) > 1e-3 for o in geometry.origin)
        assert all(0.8 * 32 <= n <= 1.2 * 32 for n in geometry.shape)
        assert image.min() <= -990  # air, stored as int16 HU
        assert abs(np.median(image[label == 1]) - 90) < 25  # organ ~80-100 HU
        assert np.median(image[:, :, 0]) < -900  # air at the border


def test_anisotropic_cases_have_thick_slices_and_fewer_of_them() -> None:
    case = synthesize_case(7, anisotropic=True, size=64)
    sx, sy, sz = case.geometry.file_spacing
    assert 0.6 < sx == sy < 0.8 and 4.0 <= sz <= 5.0
    nz, ny, nx = case.geometry.shape
    assert nz < ny / 2 and nz < nx / 2
    assert case.label.shape == case.image.shape == case.geometry.shape


def test_mri_is_positive_float_with_dark_background() -> None:
    case = synthesize_case(3, modality="mri", size=32)
    assert case.image.dtype == np.float32 and case.image.min() >= 0
    body = np.median(case.image[case.label == 1])
    assert np.median(case.image[:, :, 0]) < 0.1 * body


def test_generator_is_deterministic_per_seed(tmp_path: Path) -> None:
    first = synthesize_case((5, 1), size=16)
    again = synthesize_case((5, 1), size=16)
    other = synthesize_case((6, 1), size=16)
    assert np.array_equal(first.image, again.image) and np.array_equal(first.label, again.label)
    assert first.geometry == again.geometry and first.geometry != other.geometry
    a = make_example_dataset(tmp_path / "a", n_cases=2, size=16, seed=5, n_test=0)
    b = make_example_dataset(tmp_path / "b", n_cases=2, size=16, seed=5, n_test=0)
    for name in ("imagesTr/case_001_0000.nii.gz", "labelsTr/case_001.nii.gz"):
        (arr_a, geo_a, _), (arr_b, geo_b, _) = read_array(a / name), read_array(b / name)
        assert np.array_equal(arr_a, arr_b) and geo_a == geo_b


def test_generator_refuses_to_mix_with_an_existing_dataset(tmp_path: Path) -> None:
    root = make_example_dataset(tmp_path / "D", n_cases=3, size=16, n_test=0)
    with pytest.raises(DatasetError):
        make_example_dataset(root, n_cases=2, size=16)
    make_example_dataset(root, n_cases=2, size=16, n_test=0, overwrite=True)
    assert check_dataset(root) == []  # no stale third case left behind
    with pytest.raises(SettingsError):
        make_example_dataset(tmp_path / "E", modality="pet")


# --- the check: one corruption, one named problem ----------------------------------------------

@pytest.fixture(scope="session")
def tiny_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny") / "Dataset901_Tiny"
    return make_example_dataset(root, n_cases=2, size=16, n_test=0)


@pytest.fixture()
def tiny(tiny_source: Path, tmp_path: Path) -> Path:
    """A fresh, clean copy of a 2-case 16^3 dataset that a test may corrupt."""
    return Path(shutil.copytree(tiny_source, tmp_path / tiny_source.name))


Corruption = Callable[[Path], Path]  # corrupts a dataset in place, returns the file to blame


def _edit_json(root: Path, change: Callable[[dict], object]) -> None:
    data = json.loads((root / "dataset.json").read_text())
    change(data)
    (root / "dataset.json").write_text(json.dumps(data))


def _json(change: Callable[[dict], object]) -> Corruption:
    return lambda root: (_edit_json(root, change), root / "dataset.json")[1]


def _label(root: Path) -> Path:
    return root / "labelsTr" / f"{CASE}.nii.gz"


def _image(root: Path, channel: int = 0) -> Path:
    return root / "imagesTr" / f"{CASE}_{channel:04d}.nii.gz"


def _rewrite(path: Path, change: Callable[[np.ndarray, Geometry], tuple[np.ndarray, Geometry]]) -> Path:
    array, geometry, _ = read_array(path)
    write_image(*change(array, geometry), path)
    return path


def _label_geometry(change: Callable[[Geometry], dict]) -> Corruption:
    """Rewrite case_000's label with some Geometry fields replaced."""
    return lambda root: _rewrite(_label(root), lambda a, g: (a, dataclasses.replace(g, **change(g))))


def _label_values(change: Callable[[np.ndarray], np.ndarray]) -> Corruption:
    return lambda root: _rewrite(_label(root), lambda a, g: (change(a), g))


def _with_value(value: float, dtype: type = np.uint8) -> Callable[[np.ndarray], np.ndarray]:
    """Set two voxels of the array to `value` (cast to `dtype` first)."""
    def change(array: np.ndarray) -> np.ndarray:
        out = array.astype(dtype)
        out[0, 0, :2] = value
        return out
    return change


def _crop_label(root: Path) -> Path:
    return _rewrite(_label(root), lambda a, g: (a[:-2], dataclasses.replace(g, shape=a[:-2].shape)))


def _truncate(root: Path) -> Path:
    data = _image(root).read_bytes()
    _image(root).write_bytes(data[: len(data) // 2])
    return _image(root)


def _garbage(root: Path) -> Path:
    _image(root).write_bytes(b"not an image" * 50)
    return _image(root)


def _nan_image(root: Path) -> Path:
    return _rewrite(_image(root), lambda a, g: (_with_value(np.nan, np.float32)(a), g))


def _orphan_label(root: Path) -> Path:
    return Path(shutil.copyfile(_label(root), root / "labelsTr" / "lonely.nii.gz"))


def _badly_named_image(root: Path) -> Path:
    return Path(shutil.copyfile(_image(root), root / "imagesTr" / "case_009.nii.gz"))


def _image_as_label(root: Path) -> Path:
    return Path(shutil.copyfile(_image(root), _label(root)))


def _missing_channel(root: Path) -> Path:
    _edit_json(root, lambda d: d["channel_names"].update({"1": "T2"}))
    return _image(root, 1)


def _second_channel_with_other_spacing(root: Path) -> Path:
    _edit_json(root, lambda d: d["channel_names"].update({"1": "T2"}))
    for case in ("case_000", "case_001"):
        shutil.copyfile(root / "imagesTr" / f"{case}_0000.nii.gz", root / "imagesTr" / f"{case}_0001.nii.gz")
    spacing = {"file_spacing": (1.0, 1.0, 3.0)}
    return _rewrite(_image(root, 1), lambda a, g: (a, dataclasses.replace(g, **spacing)))


def _rgb_label(root: Path) -> Path:
    import SimpleITK as sitk

    array, _, _ = read_array(_label(root))
    image = sitk.GetImageFromArray(np.repeat(array[..., None], 3, axis=-1).astype(np.uint8), isVector=True)
    sitk.WriteImage(image, str(_label(root)))
    return _label(root)


def _v1_modality(data: dict) -> None:
    data["modality"] = data.pop("channel_names")


FLIPPED = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
FAULTS: dict[str, tuple[Corruption, str, str]] = {
    # name: (corruption, text expected in the fault, severity)
    "missing key": (_json(lambda d: d.pop("file_ending")), "'file_ending' is missing", "error"),
    "wrong numTraining": (_json(lambda d: d.update(numTraining=5)), "numTraining is 5 but 2 cases", "error"),
    "v1 labels": (_json(lambda d: d.update(labels={"0": "background", "1": "organ", "2": "lesion"})),
                  "nnU-Net v1", "warning"),
    "v1 modality key": (_json(_v1_modality), "v1 key 'modality'", "warning"),
    "missing channel": (_missing_channel, "missing channel 1", "error"),
    "label without image": (_orphan_label, "label file has no image", "error"),
    "bad file name": (_badly_named_image, "does not follow CASE_XXXX", "error"),
    "truncated gz": (_truncate, "cannot read the file", "error"),
    "garbage file": (_garbage, "cannot read the file", "error"),
    "shape mismatch": (_crop_label, "label size", "error"),
    "spacing mismatch": (_label_geometry(lambda g: {"file_spacing": tuple(1.1 * s for s in g.file_spacing)}),
                         "label spacing", "error"),
    "origin mismatch": (_label_geometry(lambda g: {"origin": (g.origin[0] + 2.5, *g.origin[1:])}),
                        "by up to 2.5 mm", "error"),
    "direction mismatch": (_label_geometry(lambda g: {"direction": FLIPPED}), "label direction", "error"),
    "channel spacing mismatch": (_second_channel_with_other_spacing, "channel spacing", "error"),
    "undeclared label": (_label_values(_with_value(5)), "5 (2 voxels)", "error"),
    "0/255 mask": (_label_values(lambda a: ((a > 0) * 255).astype(np.uint8)), "0/255", "error"),
    "intensity image as label": (_image_as_label, "looks like an intensity image", "error"),
    "non-integer label": (_label_values(_with_value(0.5, np.float32)), "non-integer values in 2 voxel",
                          "error"),
    "NaN in label": (_label_values(_with_value(np.nan, np.float32)), "2 NaN or infinite", "error"),
    "rgb label": (_rgb_label, "RGB", "error"),
    "NaN in image": (_nan_image, "2 NaN", "error"),
    "only background": (_label_values(np.zeros_like), "only background", "warning"),
}


@pytest.mark.parametrize("name", list(FAULTS))
def test_each_fault_is_found_and_named(tiny: Path, name: str) -> None:
    corrupt, fault_text, severity = FAULTS[name]
    blamed = corrupt(tiny)
    problems = check_dataset(tiny)
    matching = [p for p in problems if fault_text in p.fault]
    assert matching, f"{name}: expected {fault_text!r} in {[str(p) for p in problems]}"
    problem = matching[0]
    assert Path(problem.path) == blamed.resolve()
    assert problem.severity == severity and problem.fix.strip()
    assert str(problem).startswith(severity.upper())


@pytest.mark.parametrize("field, eps", [("origin", 1e-7), ("file_spacing", 1e-7), ("direction", 1e-8)])
def test_float_noise_in_headers_is_not_reported(tiny: Path, field: str, eps: float) -> None:
    def noisy(geometry: Geometry) -> dict:
        return {field: tuple(v + eps for v in getattr(geometry, field))}

    _label_geometry(noisy)(tiny)
    assert check_dataset(tiny) == []
    # NIfTI headers hold float32, which may round the noise away; MHA keeps doubles
    mha = tiny / "noisy.mha"
    array, geometry, _ = read_array(_image(tiny))
    write_image(array, dataclasses.replace(geometry, **noisy(geometry)), mha)
    written = read_array(mha)[1]
    assert getattr(written, field) != getattr(geometry, field)
    assert compare_geometry(written, str(mha), str(_image(tiny)), geometry, what="label") == []


def test_missing_dataset_json_is_one_problem(tmp_path: Path) -> None:
    problems = check_dataset(tmp_path)
    assert [p.fault for p in problems] == ["dataset.json is missing"]
    assert problems[0].fix


def test_explicit_case_list_missing_file_is_reported_once(tiny: Path) -> None:
    cases = {c: {"images": [f"imagesTr/{c}_0000.nii.gz"], "label": f"labelsTr/{c}.nii.gz"}
             for c in ("case_000", "case_001")}
    _edit_json(tiny, lambda d: d.update(dataset=cases))
    assert check_dataset(tiny) == []
    _label(tiny).unlink()
    problems = check_dataset(tiny)
    assert [Path(p.path) for p in problems] == [_label(tiny).resolve()]
    assert "does not exist" in problems[0].fault


def test_all_faults_are_reported_at_once_and_workers_agree(tiny: Path) -> None:
    _label_values(lambda a: ((a > 0) * 255).astype(np.uint8))(tiny)
    _nan_image(tiny)
    (tiny / "imagesTr" / "case_001_0000.nii.gz").write_bytes(b"\x1f\x8b broken")
    _edit_json(tiny, lambda d: d.update(numTraining=3))
    serial = check_dataset(tiny, workers=1)
    assert len([p for p in serial if p.severity == "error"]) == 4
    assert check_dataset(tiny, workers=2) == serial


def _folder_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        digest.update(str(path.relative_to(root)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
            digest.update(str(path.stat().st_mtime_ns).encode())
    return digest.hexdigest()


def test_check_never_modifies_the_dataset(tiny: Path) -> None:
    _label_values(_with_value(7))(tiny)
    _truncate(tiny)
    before = _folder_digest(tiny)
    assert check_dataset(tiny, workers=2)
    assert _folder_digest(tiny) == before


def test_problem_reads_as_one_line() -> None:
    problem = Problem("/d/labelsTr/a.nii.gz", "label value(s) 3 not declared", "declare it")
    assert str(problem) == "ERROR /d/labelsTr/a.nii.gz: label value(s) 3 not declared -> declare it"


@pytest.mark.realdata
def test_real_dataset_is_clean(real_dataset: Path) -> None:
    assert check_dataset(real_dataset, workers=2) == []


def test_hostile_dataset_json_gives_problems_quickly(tmp_path: Path) -> None:
    """Issue 19: 10^5 duplicated label keys are checked in linear time; a deeply nested file is one problem."""
    import time

    from autoseg.dataset.load import _read_json

    keys = ", ".join(f'"l{i % 50000}": {i}' for i in range(100000))
    path = tmp_path / "dataset.json"
    path.write_text(f'{{"labels": {{{keys}}}}}')
    started = time.perf_counter()
    _, problems = _read_json(path)
    assert time.perf_counter() - started < 5  # the quadratic check took minutes
    assert len(problems) == 21 and problems[-1].fault == "49980 more keys appear more than once"
    path.write_text("[" * 100000 + "]" * 100000)
    data, problems = _read_json(path)
    assert data is None and [p.fault for p in problems] == ["nested too deeply to be a dataset.json"]


@pytest.mark.parametrize("change, fault", [
    (lambda d: d.update(channel_names={"\u00b2": "CT"}), "are not 0, 1, 2"),  # '²'.isdigit() but int() fails
    (lambda d: d.update(channel_names={"\u0660": "CT"}), "are not 0, 1, 2"),  # Arabic-Indic zero
    (lambda d: d.update(dataset=["imagesTr/case_000_0000.nii.gz"]), "'dataset' is a list"),
    (lambda d: d.update(dataset={"case_000": "imagesTr/case_000_0000.nii.gz"}), "'dataset' entry 'case_000'"),
    (lambda d: d.update(dataset={"case_000": {"images": "imagesTr/x.nii.gz", "label": None}}), "entry 'case_000'"),
])
def test_odd_dataset_json_values_are_problems_not_tracebacks(tiny: Path, change, fault: str) -> None:
    """Issue 19 C4: non-ASCII digits as channel keys and a `dataset` entry of the wrong type."""
    _edit_json(tiny, change)
    problems = check_dataset(tiny)
    assert any(fault in p.fault for p in problems), [str(p) for p in problems]
