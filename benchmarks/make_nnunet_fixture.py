"""Build tiny nnU-Net v2 model folders with nnU-Net's own code, plus nnU-Net's predictions, as test data.

Usage (the python of a separate venv: `python3 -m venv /tmp/nnunet-venv && /tmp/nnunet-venv/bin/pip install
torch==2.13.0 nnunetv2==2.8.1`; nnunetv2 is never an autoseg dependency):
    /tmp/nnunet-venv/bin/python benchmarks/make_nnunet_fixture.py [--out tests/data/nnunet]

What it does, all through nnunetv2's functions and classes (a scratch nnUNet_raw/preprocessed/results tree):
1. writes two synthetic raw datasets (2 channels, CT and T2; spacing 2 x 1 x 1 mm): labels 0..2, and the
   same images with regions (whole = labels 1 and 2, then box = 2; regions_class_order);
2. fingerprints, plans (ExperimentPlanner and nnUNetPlannerResEncM) and preprocesses it with nnU-Net;
   the plans' features per stage are then shrunk (users edit nnUNetPlans.json the same way) so the
   networks stay tiny and the fixture small;
3. trains each model for 2 epochs of 3 iterations with nnU-Net's trainer on the CPU (`run_training`:
   real checkpoints with optimizer state, logging of numpy scalars, init_args, trainer name and mirror
   axes) -- 3d_fullres with nnUNetTrainer, 2d with nnUNetTrainerNoMirroring, 3d_fullres of the ResEnc M
   plans with nnUNetTrainer, and 3d_fullres of the region dataset; the few steps leave the weights near
   their random init, whose outputs vary from voxel to voxel (a trained tiny net predicts mostly background);
   then a cascade (`add_cascade` writes 3d_lowres and 3d_cascade_fullres into the plans as nnU-Net's planner
   would): 3d_lowres on fold "all" (its validation writes every case's previous-stage segmentation), the
   cascade on fold 0;
4. predicts two test scans with nnUNetPredictor (CPU, TTA on, step 0.5, probabilities saved), one on
   the plan's grid and one that must be cropped and resampled (anisotropic spacing, zero border); then
   again with the sliding window's accumulators and Gaussian in float32 instead of nnU-Net's float16
   (`predictions_fp32/`: nnU-Net's computation at autoseg's precision), and stores nnU-Net's
   preprocessed arrays of the second scan. The cascade's predictions take the stored 3d_lowres predictions
   as `folder_with_segs_from_prev_stage`.

`--cascade-only` adds only the two cascade models to an existing OUT (its scans and other models kept).

Output (OUT): imagesTs/, and per model `<dataset>/<Trainer>__<Plans>__<configuration>/` (plans.json, dataset.json,
fold_0/checkpoint_final.pth) with `predictions/` (CASE.nii.gz, CASE.npz with nnU-Net's probabilities as
float16) beside them; the 3d_fullres folder also holds preprocessed_b.npz (nnU-Net's DefaultPreprocessor
output for case b, key `data`). A scratch copy of this folder is what tests/test_sharing_nnunet.py reads.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

#: id -> (name, labels, regions_class_order): plain labels, and regions (whole = ball or box, then the box).
DATASETS = {
    990: ("Dataset990_Tiny", {"background": 0, "ball": 1, "box": 2}, None),
    991: ("Dataset991_TinyRegions", {"background": 0, "whole": [1, 2], "box": 2}, [1, 2]),
}
TINY_FEATURES = (2, 4, 8, 8, 8, 8, 8, 8)
MODELS = (  # (dataset id, plans identifier, configuration, trainer)
    (990, "nnUNetPlans", "3d_fullres", "nnUNetTrainer"),
    (990, "nnUNetPlans", "2d", "nnUNetTrainerNoMirroring"),
    (990, "nnUNetResEncUNetMPlans", "3d_fullres", "nnUNetTrainer"),
    (991, "nnUNetPlans", "3d_fullres", "nnUNetTrainer"),
)
#: The cascade (plans edited by `add_cascade`): 3d_lowres trained on every case (fold "all", so that its
#: validation writes the previous-stage segmentation of every case), then 3d_cascade_fullres on fold 0.
CASCADE = ((990, "nnUNetPlans", "3d_lowres", "nnUNetTrainer", "all"),
           (990, "nnUNetPlans", "3d_cascade_fullres", "nnUNetTrainer", "0"))


def write_image(array: np.ndarray, spacing_zyx: tuple[float, ...], path: Path, origin=(0.0, 0.0, 0.0)) -> None:
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(float(s) for s in reversed(spacing_zyx)))
    image.SetOrigin(origin)
    sitk.WriteImage(image, str(path))


def synthetic_case(rng: np.random.Generator, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(CT channel, T2 channel, labels) (z, y, x): a bright ball (label 1) and a dark box (label 2) in noise."""
    z, y, x = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    centre = [rng.uniform(0.35, 0.65) * n for n in shape]
    radius = rng.uniform(0.18, 0.28) * min(shape[1:])
    ball = ((z - centre[0]) * 2) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2 < radius**2
    box = (z > shape[0] // 5) & (z < shape[0] // 2) & (y > 2) & (y < shape[1] // 3) & (x > shape[2] // 2)
    labels = np.zeros(shape, dtype=np.uint8)
    labels[box] = 2
    labels[ball] = 1
    ct = rng.normal(40, 25, shape) + 300 * (labels == 1) - 200 * (labels == 2)
    t2 = rng.normal(100, 10, shape) + 60 * (labels == 2) - 30 * (labels == 1)
    return np.round(ct).astype(np.int16), np.round(t2).astype(np.int16), labels  # integers: a smaller fixture


def write_raw_dataset(raw: Path, dataset_id: int, rng: np.random.Generator) -> Path:
    name, label_names, order = DATASETS[dataset_id]
    root = raw / name
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for i in range(6):
        ct, t2, labels = synthetic_case(rng, (20 + 2 * (i % 2), 28, 32 - 2 * (i % 3)))
        write_image(ct, (2.0, 1.0, 1.0), root / "imagesTr" / f"tiny_{i:03d}_0000.nii.gz")
        write_image(t2, (2.0, 1.0, 1.0), root / "imagesTr" / f"tiny_{i:03d}_0001.nii.gz")
        write_image(labels, (2.0, 1.0, 1.0), root / "labelsTr" / f"tiny_{i:03d}.nii.gz")
    dataset = {"channel_names": {"0": "CT", "1": "T2"}, "labels": label_names, "numTraining": 6,
               "file_ending": ".nii.gz", "name": name}
    if order is not None:
        dataset["regions_class_order"] = order
    (root / "dataset.json").write_text(json.dumps(dataset, indent=4))
    return root


def write_test_scans(folder: Path, rng: np.random.Generator) -> None:
    """case a: on the plan's grid; case b: anisotropic spacing (separate-z resampling) and a zero border."""
    folder.mkdir(parents=True)
    ct, t2, _ = synthetic_case(rng, (22, 30, 30))
    write_image(ct, (2.0, 1.0, 1.0), folder / "a_0000.nii.gz")
    write_image(t2, (2.0, 1.0, 1.0), folder / "a_0001.nii.gz")
    ct, t2, _ = synthetic_case(rng, (13, 34, 31))
    ct[:, :3], t2[:, :3] = 0, 0  # cropped away by nnU-Net's crop to the non-zero region
    write_image(ct, (3.2, 0.8, 0.9), folder / "b_0000.nii.gz", origin=(-12.5, 3.0, 40.25))
    write_image(t2, (3.2, 0.8, 0.9), folder / "b_0001.nii.gz", origin=(-12.5, 3.0, 40.25))


def shrink_plans(path: Path) -> dict:
    """Tiny features per stage (and at most 2 ResEnc blocks a stage), written back as nnU-Net writes plans."""
    from batchgenerators.utilities.file_and_folder_operations import load_json, save_json

    plans = load_json(str(path))
    for config in plans["configurations"].values():
        kwargs = config.get("architecture", {}).get("arch_kwargs")
        if kwargs is None:
            continue
        kwargs["features_per_stage"] = list(TINY_FEATURES[: kwargs["n_stages"]])
        if "n_blocks_per_stage" in kwargs:
            kwargs["n_blocks_per_stage"] = [min(b, 2) for b in kwargs["n_blocks_per_stage"]]
    save_json(plans, str(path), sort_keys=False)
    return plans


def add_cascade(path: Path) -> dict:
    """3d_lowres (the 3d_fullres plan at twice the spacing) and 3d_cascade_fullres, written into the plans the
    way nnU-Net's planner writes them when the full-resolution patch covers too little of the images (these
    tiny images never need a cascade, so the planner would not add one)."""
    import copy

    from batchgenerators.utilities.file_and_folder_operations import load_json, save_json

    plans = load_json(str(path))
    full = plans["configurations"]["3d_fullres"]
    low = copy.deepcopy(full)
    low["spacing"] = [2 * s for s in full["spacing"]]
    low["median_image_size_in_voxels"] = [max(1, round(n / 2)) for n in full["median_image_size_in_voxels"]]
    low["data_identifier"] = f"{plans['plans_name']}_3d_lowres"
    low["next_stage"] = "3d_cascade_fullres"
    plans["configurations"]["3d_lowres"] = low
    plans["configurations"]["3d_cascade_fullres"] = {"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"}
    save_json(plans, str(path), sort_keys=False)
    return plans


#: Where the trainers used here live. nnU-Net's own search imports every trainer module, including the Primus
#: ones, whose timm import needs a torchvision built for the installed torch (not available for torch 2.13 CPU).
TRAINER_MODULES = {
    "nnUNetTrainer": "nnunetv2.training.nnUNetTrainer.nnUNetTrainer",
    "nnUNetTrainerNoMirroring": "nnunetv2.training.nnUNetTrainer.variants.data_augmentation.nnUNetTrainerNoMirroring",
}


def trainer_class(name: str) -> type:
    return getattr(importlib.import_module(TRAINER_MODULES[name]), name)


def train(plans: dict, configuration: str, trainer_name: str, dataset_json: dict, fold: str = "0") -> None:
    import random

    import torch

    torch.manual_seed(0)
    np.random.seed(0)  # nnU-Net's sampling and augmentation draw from numpy's and Python's global generators
    random.seed(0)
    trainer = trainer_class(trainer_name)(plans=dict(plans, continue_training=False), configuration=configuration,
                                          fold=int(fold) if fold.isdigit() else fold, dataset_json=dataset_json,
                                          device=torch.device("cpu"))
    trainer.num_epochs, trainer.num_iterations_per_epoch, trainer.num_val_iterations_per_epoch = 2, 3, 2
    trainer.run_training()
    if plans["configurations"][configuration].get("next_stage"):  # the next stage trains on these segmentations
        trainer.perform_actual_validation(False)


def predict(model: Path, scans: Path, output: Path, *, float32: bool = False, fold: str = "0",
            previous: Path | None = None) -> None:
    """nnUNetPredictor on the CPU (TTA, step 0.5). `float32`: the same, except that the sliding window's
    accumulators and Gaussian are float32 instead of nnU-Net's float16 (what autoseg accumulates in).
    `previous`: a cascade stage's folder of previous-stage segmentations."""
    import torch
    from nnunetv2.inference import predict_from_raw_data, sliding_window_prediction
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predict_from_raw_data.recursive_find_trainer_class_by_name = trainer_class  # see TRAINER_MODULES
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True,
                                perform_everything_on_device=False, device=torch.device("cpu"), allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(model), use_folds=(int(fold) if fold.isdigit() else fold,),
                                                  checkpoint_name="checkpoint_final.pth")
    output.mkdir(parents=True, exist_ok=True)
    half, gaussian = torch.half, sliding_window_prediction.compute_gaussian
    if float32:
        torch.half = torch.float32
        predict_from_raw_data.compute_gaussian = functools.lru_cache(maxsize=2)(
            lambda *a, **k: gaussian(*a, **{**k, "dtype": torch.float32}))
    try:
        predictor.predict_from_files_sequential(str(scans), str(output), save_probabilities=not float32,
                                                overwrite=True, folder_with_segs_from_prev_stage=(
                                                    None if previous is None else str(previous)))
    finally:
        torch.half, predict_from_raw_data.compute_gaussian = half, gaussian


def preprocessed_case(model: Path, scans: Path, configuration: str) -> np.ndarray:
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans = PlansManager(load_json(str(model / "plans.json")))
    dataset_json = load_json(str(model / "dataset.json"))
    data, _, _ = DefaultPreprocessor(verbose=False).run_case(
        [str(scans / "b_0000.nii.gz"), str(scans / "b_0001.nii.gz")], None, plans,
        plans.get_configuration(configuration), dataset_json)
    return data.astype(np.float32)


def copy_model(model: Path, out: Path, fold: str = "0") -> Path:
    """plans.json, dataset.json and fold_<fold>/checkpoint_final.pth: what an nnU-Net model folder must hold."""
    target = out / model.name
    (target / f"fold_{fold}").mkdir(parents=True)
    for name in ("plans.json", "dataset.json"):
        shutil.copyfile(model / name, target / name)
    shutil.copyfile(model / f"fold_{fold}" / "checkpoint_final.pth", target / f"fold_{fold}" / "checkpoint_final.pth")
    return target


def make_model(scratch: Path, raw: Path, out: Path, model_key: tuple[int, str, str, str], fold: str) -> None:
    """Train one model with nnU-Net, copy it into OUT and store nnU-Net's predictions of OUT/imagesTs (a
    cascade stage's with the previous stage's predictions stored before it)."""
    from batchgenerators.utilities.file_and_folder_operations import load_json

    dataset_id, plans_name, configuration, trainer = model_key
    dataset = DATASETS[dataset_id][0]
    plans = load_json(str(scratch / "preprocessed" / dataset / f"{plans_name}.json"))
    train(plans, configuration, trainer, load_json(str(raw / "dataset.json")), fold)
    model = scratch / "results" / dataset / f"{trainer}__{plans_name}__{configuration}"
    target = copy_model(model, out / dataset, fold)
    previous = plans["configurations"][configuration].get("previous_stage")
    for folder, float32 in (("predictions", False), ("predictions_fp32", True)):
        earlier = None if previous is None else out / dataset / f"{trainer}__{plans_name}__{previous}" / folder
        predict(target, out / "imagesTs", target / folder, float32=float32, fold=fold, previous=earlier)
        for extra in ("plans.json", "dataset.json", "predict_from_raw_data_args.json", "a.pkl", "b.pkl"):
            (target / folder / extra).unlink(missing_ok=True)  # only the labels and probabilities
    for npz in (target / "predictions").glob("*.npz"):  # float16 halves the fixture; margins stay readable
        probabilities = np.load(npz)["probabilities"]
        np.savez_compressed(npz, probabilities=probabilities.astype(np.float16))
    if (dataset_id, plans_name, configuration) == (990, "nnUNetPlans", "3d_fullres"):
        np.savez_compressed(target / "preprocessed_b.npz",
                            data=preprocessed_case(target, out / "imagesTs", configuration))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "tests/data/nnunet")
    parser.add_argument("--cascade-only", action="store_true",
                        help="add only the cascade models to an existing OUT (its imagesTs and other models kept)")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="nnunet-fixture-"))
    for name in ("raw", "preprocessed", "results"):
        os.environ[f"nnUNet_{name}"] = str(scratch / name)
    os.environ.update(nnUNet_n_proc_DA="1", nnUNet_compile="false")
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints, plan_experiments, preprocess

    rng = np.random.default_rng(990)
    raws = {dataset_id: write_raw_dataset(scratch / "raw", dataset_id, rng) for dataset_id in DATASETS}
    extract_fingerprints(list(DATASETS), num_processes=1, check_dataset_integrity=True, show_progress_bar=False)
    plan_experiments(list(DATASETS))
    plan_experiments([990], "nnUNetPlannerResEncM")
    models = [(*m, "0") for m in MODELS if not args.cascade_only] + list(CASCADE)
    for dataset_id, plans_name in sorted({m[:2] for m in models}):
        plans_file = scratch / "preprocessed" / DATASETS[dataset_id][0] / f"{plans_name}.json"
        shrink_plans(plans_file)
        if (dataset_id, plans_name) == CASCADE[0][:2]:
            add_cascade(plans_file)
        configs = {m[2] for m in models if m[:2] == (dataset_id, plans_name)} - {"3d_cascade_fullres"}
        configs = tuple(sorted(configs | ({"3d_fullres"} if dataset_id == CASCADE[0][0] else set())))
        preprocess([dataset_id], plans_name, configs, num_processes=[1] * len(configs), show_progress_bar=False)
    os.environ["nnUNet_n_proc_DA"] = "0"  # training: augmentation in this process (planning needs >= 1)
    if not args.cascade_only:
        if args.out.exists():
            shutil.rmtree(args.out)
        write_test_scans(args.out / "imagesTs", rng)
    for dataset_id, plans_name, configuration, trainer, fold in models:
        make_model(scratch, raws[dataset_id], args.out, (dataset_id, plans_name, configuration, trainer), fold)
    shutil.rmtree(scratch)
    size = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(f"wrote {args.out} ({size / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
