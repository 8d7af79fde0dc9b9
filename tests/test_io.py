"""Reading and writing keeps geometry exactly; arrays come back in (z, y, x) order."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autoseg.errors import ImageReadError
from autoseg.io import Geometry, file_ending, read_header, read_images, read_label, write_image, write_label
from autoseg.io.geometry import geometry_from_affine
from autoseg.io.readers import read_array


def _rotation(angle: float) -> tuple[float, ...]:
    c, s = np.cos(angle), np.sin(angle)
    return tuple(float(v) for v in np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]).reshape(-1))


OBLIQUE = Geometry(shape=(5, 6, 7), file_spacing=(0.8, 0.9, 2.5), origin=(-10.5, 3.25, 100.0),
                   direction=_rotation(0.3))


@pytest.mark.parametrize("ending", [".nii.gz", ".nii", ".mha", ".nrrd"])
def test_geometry_round_trips_for_every_format(tmp_path: Path, ending: str) -> None:
    array = np.arange(5 * 6 * 7, dtype=np.int16).reshape(5, 6, 7)
    path = tmp_path / f"img{ending}"
    write_image(array, OBLIQUE, path)
    images, geometry = read_images([path])
    assert images.shape == (1, 5, 6, 7) and images.dtype == np.float32
    assert np.array_equal(images[0], array)
    assert geometry.shape == OBLIQUE.shape
    assert all(v < 1e-5 for v in geometry.differences(OBLIQUE).values())
    assert geometry.array_spacing == pytest.approx((2.5, 0.9, 0.8))
    header, components = read_header(path)
    assert header == geometry and components == 1


@settings(max_examples=15, deadline=None)
@given(
    spacing=st.tuples(*[st.floats(0.1, 5.0)] * 3),
    origin=st.tuples(*[st.floats(-500, 500)] * 3),
    angle=st.floats(-3.1, 3.1),
    flip=st.sampled_from([1.0, -1.0]),
)
def test_label_geometry_round_trips_with_any_orientation(
    tmp_path_factory: pytest.TempPathFactory, spacing, origin, angle, flip
) -> None:
    direction = np.array(_rotation(angle)).reshape(3, 3) @ np.diag([1.0, flip, flip])
    geometry = Geometry(shape=(3, 4, 5), file_spacing=spacing, origin=origin,
                        direction=tuple(direction.reshape(-1)))
    label = np.random.default_rng(0).integers(0, 3, size=(3, 4, 5))
    path = tmp_path_factory.mktemp("lab") / "lab.mha"
    write_label(label, geometry, path)
    read, restored = read_label(path)
    assert np.array_equal(read, label)
    diffs = restored.differences(geometry)
    assert diffs["spacing"] < 1e-6 and diffs["origin"] < 1e-6 and diffs["direction"] < 1e-6


def test_two_dimensional_images_get_a_dummy_axis(tmp_path: Path) -> None:
    geometry = Geometry(shape=(1, 4, 6), file_spacing=(0.5, 0.25), origin=(0.0, 0.0),
                        direction=(1.0, 0.0, 0.0, 1.0))
    write_image(np.ones((1, 4, 6), np.uint8), geometry, tmp_path / "a.nii.gz")
    images, read = read_images([tmp_path / "a.nii.gz"])
    assert images.shape == (1, 1, 4, 6)
    assert read.array_spacing == (999.0, 0.25, 0.5)


def test_non_orthonormal_nifti_is_read_through_nibabel(tmp_path: Path) -> None:
    import nibabel as nib

    affine = np.array([[1.0, 0.3, 0, 5], [0, 1.0, 0, -2], [0, 0, 2.0, 7], [0, 0, 0, 1]])
    data = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)  # (x, y, z)
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "skew.nii.gz")
    images, geometry = read_images([tmp_path / "skew.nii.gz"])
    assert images.shape == (1, 6, 5, 4)
    assert np.array_equal(images[0], data.transpose(2, 1, 0))
    assert geometry.origin == pytest.approx((-5.0, 2.0, 7.0))
    assert max(geometry.differences(geometry_from_affine(affine, data.shape)).values()) < 1e-6


def test_float_label_with_whole_numbers_is_cast(tmp_path: Path) -> None:
    write_image(np.array([[[0.0, 1.0], [2.0, 0.0]]], np.float32), OBLIQUE, tmp_path / "l.nii.gz")
    label, _ = read_label(tmp_path / "l.nii.gz")
    assert np.issubdtype(label.dtype, np.integer) and label.max() == 2


def test_fractional_label_and_missing_or_corrupt_files_raise(tmp_path: Path) -> None:
    write_image(np.array([[[0.5, 1.0]]], np.float32), OBLIQUE, tmp_path / "l.nii.gz")
    with pytest.raises(ImageReadError, match="non-integer"):
        read_label(tmp_path / "l.nii.gz")
    with pytest.raises(ImageReadError, match="not found"):
        read_images([tmp_path / "missing.nii.gz"])
    (tmp_path / "broken.nii.gz").write_bytes(b"\x1f\x8b\x08 not really gzip")
    with pytest.raises(ImageReadError) as err:
        read_images([tmp_path / "broken.nii.gz"])
    assert err.value.path == str(tmp_path / "broken.nii.gz") and err.value.hint


def test_channels_of_different_shape_are_refused(tmp_path: Path) -> None:
    write_image(np.zeros((5, 6, 7), np.float32), OBLIQUE, tmp_path / "a.nii.gz")
    write_image(np.zeros((5, 6, 8), np.float32), OBLIQUE, tmp_path / "b.nii.gz")
    with pytest.raises(ImageReadError, match="channel shape"):
        read_images([tmp_path / "a.nii.gz", tmp_path / "b.nii.gz"])


def test_file_ending() -> None:
    assert file_ending("x/CASE_0000.NII.GZ") == ".nii.gz"
    assert file_ending("a.mha") == ".mha" and file_ending("a.png") == ""


def test_truncated_nifti_and_nan_voxels_are_not_hidden(tmp_path: Path) -> None:
    array = np.random.default_rng(1).normal(size=(8, 9, 10)).astype(np.float32)
    array[1, 2, 3] = np.nan
    path = tmp_path / "img.nii.gz"
    write_image(array, OBLIQUE, path)
    images, _ = read_images([path])
    assert np.isnan(images[0, 1, 2, 3])  # SimpleITK alone would return 0 here
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match="cannot read") as err:
        read_images([path])
    assert "truncated" in err.value.hint


@pytest.mark.parametrize("ending", [".nii", ".nii.gz", ".mha", ".mhd", ".nrrd"])
def test_a_header_claiming_more_voxels_than_the_file_holds_is_refused_before_allocating(tmp_path: Path,
                                                                                       ending: str) -> None:
    """Issue 19 S3: a tiny file whose header claims 1024^3 float32 voxels (4 GiB) is refused from the header."""
    small = tmp_path / f"small{ending}"
    write_image(np.zeros((4, 4, 4), np.float32), Geometry((4, 4, 4), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0),
                                                          (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0)), small)
    claim = tmp_path / f"claim{ending}"
    if ending in (".nii", ".nii.gz"):
        import nibabel as nib

        header = nib.Nifti1Header()
        header.set_data_dtype(np.float32)
        header.set_data_shape((1024, 1024, 1024))
        raw = header.binaryblock + b"\0" * 4 + b"\0" * 100
        claim.write_bytes(gzip.compress(raw) if ending == ".nii.gz" else raw)
    else:
        text = small.read_bytes()
        text = text.replace(b"DimSize = 4 4 4", b"DimSize = 1024 1024 1024").replace(b"sizes: 4 4 4",
                                                                                   b"sizes: 1024 1024 1024")
        claim.write_bytes(text)
        if ending == ".mhd":
            for data in tmp_path.glob("small.*raw*"):
                data.rename(tmp_path / data.name.replace("small", "claim"))
            claim.write_bytes(claim.read_bytes().replace(b"small.", b"claim."))
    with pytest.raises(ImageReadError, match=r"claims 1024x1024x1024 voxels \(4.0 GiB\)"):
        read_array(claim)
    if ending != ".mhd":  # the original file still reads (its claim is honest)
        assert read_array(small)[0].shape == (4, 4, 4)


@pytest.mark.parametrize("ending", [".mhd", ".nhdr"])
def test_detached_formats_are_written_atomically(tmp_path: Path, ending: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 19 D1: a write killed half-way leaves no header under the final name (a rerun would skip it)."""
    import SimpleITK as sitk

    array = np.arange(60, dtype=np.int16).reshape(3, 4, 5)
    target = tmp_path / f"case{ending}"
    write_image(array, OBLIQUE.__class__((3, 4, 5), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0),
                                         (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0)), target)
    assert np.array_equal(read_array(target)[0], array)
    real_write = sitk.WriteImage

    def dies_after_the_data(image, name, *args, **kwargs):
        real_write(image, name, *args, **kwargs)
        Path(name).unlink()  # the header was still being written when the process died
        raise OSError("No space left on device")

    monkeypatch.setattr(sitk, "WriteImage", dies_after_the_data)
    other = tmp_path / f"other{ending}"
    with pytest.raises(OSError, match="No space"):
        write_image(array, read_array(target)[1], other)
    assert not other.exists() and not list(tmp_path.glob(".autoseg-partial-*"))
