"""Benchmark autoseg's resampling against nnU-Net's skimage-based resampling, in one run.

Usage:
    OMP_NUM_THREADS=2 python benchmarks/bench_resample.py [--data FOLDER] [--cases N] [--repeats N]
                                                          [--markdown FILE] [--skip-large]

Cases: (a) the first N real Hippocampus cases (1 mm) resampled to 0.7 mm and to 1.3 mm; (b) a synthetic
CT of 300 x 512 x 512 voxels (z, y, x) at 2.5 x 0.8 x 0.8 mm resampled to 1.5 x 0.7 x 0.7 mm, which
takes nnU-Net's "separate z" path (anisotropy 3.1 > 3); (c) a synthetic 256^3 volume at 1.5 mm
resampled to 1.0 mm (full 3D). Images use order 3, labels order 1 per label (nnU-Net's defaults).

The reference side is written here after nnU-Net v2's procedure (reference/nnunet-v2.md §5.3):
`skimage.transform.resize(order, mode='edge', anti_aliasing=False)` per channel (per slice with
separate z, followed by `map_coordinates(order=0)` on a full `np.mgrid` along z), and labels as
`resize_segmentation` does (each label's mask resized with order 1, >= 0.5, ascending).
Every measurement runs in its own process: inputs are loaded, a task of several cases resamples its
first case once untimed (lazy imports, thread pools), the peak-RSS counter is reset
(/proc/self/clear_refs), the task runs --repeats times (first and best time are reported), and the
increase of VmHWM over VmRSS at the reset is reported. Outputs
are saved and compared afterwards: max |difference| relative to the input's intensity range for
images, number of differing voxels for labels. Prints a Markdown table (and writes it with
--markdown).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "Dataset004_Hippocampus"


# ---------------------------------------------------------------- inputs


def phantom(shape: tuple[int, int, int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic CT in HU (float32, (z, y, x)) and labels (int8: -1 outside the body, 0 body, 1-4 organs).

    An elliptic body, three ellipsoid organs, a vessel two voxels wide along z, Gaussian noise.
    """
    rng = np.random.default_rng(seed)
    nz, ny, nx = shape
    z, y, x = np.ogrid[:nz, :ny, :nx]
    body = np.broadcast_to(((y - ny / 2) / (0.42 * ny)) ** 2 + ((x - nx / 2) / (0.47 * nx)) ** 2 < 1, shape)
    image = np.where(body, 40.0, -1000.0).astype(np.float32)
    label = np.where(body, 0, -1).astype(np.int8)
    organs = [((0.5, 0.45, 0.35), (0.3, 0.18, 0.2), 60.0, 1), ((0.45, 0.55, 0.65), (0.2, 0.08, 0.08), 30.0, 2),
              ((0.6, 0.35, 0.6), (0.15, 0.07, 0.07), 25.0, 3)]
    for (cz, cy, cx), (rz, ry, rx), hu, value in organs:
        inside = ((z - cz * nz) / (rz * nz)) ** 2 + ((y - cy * ny) / (ry * ny)) ** 2 + ((x - cx * nx) / (rx * nx)) ** 2
        image[inside < 1] = hu
        label[inside < 1] = value
    vy, vx = int(0.6 * ny), int(0.45 * nx)
    image[:, vy:vy + 2, vx:vx + 2] = 200.0
    label[:, vy:vy + 2, vx:vx + 2] = 4
    image += rng.normal(0.0, 15.0, shape).astype(np.float32)
    return image, label


def prepare_inputs(folder: Path, data: Path, n_cases: int, large: bool) -> list[dict]:
    """Write each task's arrays to `folder`; return the task list (name, files, spacings, separate axis)."""
    from autoseg.io import read_images, read_label
    from autoseg.preprocessing.resample import compute_new_shape, separate_axis

    tasks = []
    labels = sorted((data / "labelsTr").glob("*.nii.gz"))[:n_cases]
    arrays = {}
    for i, label_path in enumerate(labels):
        image, _ = read_images([data / "imagesTr" / label_path.name.replace(".nii.gz", "_0000.nii.gz")])
        arrays[f"image_{i}"], arrays[f"label_{i}"] = image, read_label(label_path)[0]
    np.savez(folder / "hippo.npz", **arrays)
    for target in (0.7, 1.3):
        shapes = [compute_new_shape(arrays[f"label_{i}"].shape, (1.0,) * 3, (target,) * 3) for i in range(len(labels))]
        tasks.append({"name": f"Hippocampus x{len(labels)}, 1.0 -> {target} mm", "input": "hippo.npz",
                      "shapes": shapes, "axis": None})
    if large:
        for key, shape, old, new in (("ct", (300, 512, 512), (2.5, 0.8, 0.8), (1.5, 0.7, 0.7)),
                                     ("iso", (256, 256, 256), (1.5,) * 3, (1.0,) * 3)):
            image, label = phantom(shape)
            np.savez(folder / f"{key}.npz", image_0=image[None], label_0=label)
            new_shape = compute_new_shape(shape, old, new)
            name = f"synthetic {'x'.join(map(str, shape))} at {'x'.join(map(str, old))} -> {'x'.join(map(str, new))} mm"
            tasks.append({"name": name, "input": f"{key}.npz", "shapes": [new_shape],
                          "axis": separate_axis(old, new)})
    return tasks


# ---------------------------------------------------------------- the reference (nnU-Net's way, on skimage)


def _nearest_along(volume: np.ndarray, new_shape: tuple[int, ...]) -> np.ndarray:
    """nnU-Net's z step: map_coordinates(order=0, mode='nearest') on a full half-pixel-centre grid."""
    from scipy.ndimage import map_coordinates

    grid = list(np.mgrid[tuple(slice(0, n) for n in new_shape)])  # views; the int grid lives until replaced
    for a, (old, new) in enumerate(zip(volume.shape, new_shape)):
        grid[a] = (old / new) * (grid[a] + 0.5) - 0.5
    coords = np.array(grid)
    del grid
    return map_coordinates(volume, coords, order=0, mode="nearest")


def reference_volume(volume: np.ndarray, new_shape: tuple[int, ...], axis: int | None, is_label: bool) -> np.ndarray:
    """One channel the nnU-Net way: 3D resize, or slice-wise in-plane resize + nearest along `axis`."""
    resize = reference_label_resize if is_label else reference_image_resize
    if axis is None:
        return resize(volume, new_shape)
    plane = tuple(n for a, n in enumerate(new_shape) if a != axis)
    slices = [resize(np.take(volume, i, axis=axis), plane) for i in range(volume.shape[axis])]
    stacked = np.stack(slices, axis=axis)
    return stacked if stacked.shape == tuple(new_shape) else _nearest_along(stacked, new_shape)


def reference_image_resize(volume: np.ndarray, new_shape: tuple[int, ...]) -> np.ndarray:
    from skimage.transform import resize

    return resize(volume.astype(np.float64), new_shape, 3, mode="edge", anti_aliasing=False)


def reference_label_resize(seg: np.ndarray, new_shape: tuple[int, ...]) -> np.ndarray:
    from skimage.transform import resize

    out = np.zeros(new_shape, dtype=seg.dtype)
    for value in np.unique(seg):
        mask = resize((seg == value).astype(np.float64), new_shape, 1, mode="edge", clip=True, anti_aliasing=False)
        out[mask >= 0.5] = value
    return out


# ---------------------------------------------------------------- one measurement (child process)


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(side: str, kind: str, task: dict, folder: Path, result_file: Path, repeats: int) -> None:
    """Resample every case of `task` `repeats` times with one side; print the seconds of each run and
    the peak RSS increase as JSON."""
    if side == "autoseg":
        from autoseg.preprocessing.resample import resample_image, resample_label

        def run(array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
            if kind == "image":
                return resample_image(array, shape, order=3, separate_axis=task["axis"])
            return resample_label(array, shape, order=1, separate_axis=task["axis"])
    else:
        import skimage.transform  # noqa: F401  (imported before the clock starts)

        def run(array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
            if kind == "image":
                return np.stack([reference_volume(c, shape, task["axis"], False) for c in array])
            return reference_volume(array, shape, task["axis"], True)
    with np.load(folder / task["input"]) as stored:
        inputs = [stored[f"{kind}_{i}"] for i in range(len(task["shapes"]))]
    if len(inputs) > 1:
        run(inputs[0], tuple(task["shapes"][0]))  # warm-up, untimed: lazy imports, BLAS threads
    reset = True
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        reset = False
    rss = _status_kb("VmRSS")
    seconds = []
    for _ in range(repeats):
        outputs = None  # the previous run's outputs are freed before the next starts
        start = time.perf_counter()
        outputs = [run(array, tuple(shape)) for array, shape in zip(inputs, task["shapes"])]
        seconds.append(time.perf_counter() - start)
    peak = _status_kb("VmHWM")
    np.savez(result_file, *outputs)
    print(json.dumps({"seconds": seconds, "peak_mb": (peak - rss) / 1024, "hwm_reset": reset}))


def measure(side: str, kind: str, task: dict, folder: Path, repeats: int) -> dict:
    result_file = folder / f"{side}_{kind}.npz"
    arguments = [side, kind, task, str(folder), str(result_file), repeats]
    command = [sys.executable, __file__, "--child", json.dumps(arguments)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{side} {kind} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def difference(kind: str, task: dict, folder: Path) -> float:
    """Images: max |autoseg - reference| / input range; labels: number of differing voxels."""
    worst = 0.0
    with np.load(folder / task["input"]) as stored, np.load(folder / f"autoseg_{kind}.npz") as ours, \
            np.load(folder / f"reference_{kind}.npz") as theirs:
        for i in range(len(task["shapes"])):
            a, b = ours[f"arr_{i}"], theirs[f"arr_{i}"]
            if kind == "label":
                worst += float(np.count_nonzero(a != b))
            else:
                span = float(np.ptp(stored[f"image_{i}"])) or 1.0
                worst = max(worst, float(np.abs(a.astype(np.float64) - b).max()) / span)
    return worst


# ---------------------------------------------------------------- table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--cases", type=int, default=20)
    parser.add_argument("--markdown", type=Path, default=None)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per side and task")
    parser.add_argument("--skip-large", action="store_true")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        side, kind, task, folder, result_file, repeats = json.loads(args.child)
        child(side, kind, task, Path(folder), Path(result_file), repeats)
        return
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_resample_") as tmp:
        folder = Path(tmp)
        for task in prepare_inputs(folder, args.data, args.cases, not args.skip_large):
            for kind in ("image", "label"):
                ours = measure("autoseg", kind, task, folder, args.repeats)
                theirs = measure("reference", kind, task, folder, args.repeats)
                rows.append((task, kind, ours, theirs, difference(kind, task, folder)))
                print(format_row(*rows[-1]), flush=True)
    table = render(rows, args)
    print(table)
    if args.markdown:
        args.markdown.write_text(table)


def format_row(task: dict, kind: str, ours: dict, theirs: dict, diff: float) -> str:
    """One table row: first (cold) and best of the timed runs, peak RSS increase, agreement."""
    axis = "-" if task["axis"] is None else str(task["axis"])
    accuracy = f"{diff:.1e} of range" if kind == "image" else f"{int(diff)} voxels differ"
    ref, own = theirs["seconds"], ours["seconds"]
    return (f"| {task['name']} | {kind} | {axis} | {ref[0]:.3f} / {min(ref):.3f} | {own[0]:.3f} / {min(own):.3f} | "
            f"**{ref[0] / own[0]:.1f}x** / **{min(ref) / min(own):.1f}x** | {theirs['peak_mb']:.0f} | "
            f"{ours['peak_mb']:.0f} | {accuracy} |")


def render(rows: list, args: argparse.Namespace) -> str:
    cores = os.cpu_count()
    head = [
        "## Resampling (autoseg vs nnU-Net's skimage-based resampling)",
        "",
        f"Measured {datetime.date.today().isoformat()} on {platform.machine()} Linux, {cores} cores, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, numpy {np.__version__}.",
        f"Command: `OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')} python benchmarks/bench_resample.py"
        f"{' --skip-large' if args.skip_large else ''} --cases {args.cases} --repeats {args.repeats}`",
        "",
        f"Seconds are first run / best of {args.repeats} runs in one process (the first run also pays the",
        "page faults of fresh memory); peak MB is the increase of the process's peak RSS over all runs.",
        "",
        "| case | data | separate axis | reference s | autoseg s | speed-up | reference peak MB | "
        "autoseg peak MB | autoseg vs reference |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    return "\n".join(head + [format_row(*row) for row in rows]) + "\n"


if __name__ == "__main__":
    main()
