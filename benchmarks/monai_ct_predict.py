"""What a MONAI user writes to apply a model nnU-Net trained to CT scans: bench_nnunet_ct.py's `monai` tool.

Runs in a venv with monai and nnunetv2 (never autoseg's: `/tmp/nnunet-venv/bin/pip install monai torch==2.13.0`).
The network is nnU-Net's own (built from the model folder's plans.json by nnU-Net's helper, the fold's
final weights, deep supervision off); the scans are read with SimpleITK, normalised as nnU-Net's
CTNormalization does (clip to the foreground's 0.5 / 99.5 percentiles, subtract the mean, divide by the
standard deviation, all from plans.json), segmented by `monai.inferers.sliding_window_inference` (the plan's
patch, one tile per call, overlap 0.5, Gaussian importance with sigma = patch / 8, constant padding; with
--tta the same call on each of the 8 flipped volumes, flipped back and averaged) and written with the input's
geometry. No resampling: the scans must already have the plan's spacing (the script checks it), which is
the case for bench_nnunet_ct.py's synthetic scans.

    python monai_ct_predict.py MODEL_FOLDER FOLD INPUT_FOLDER OUTPUT_FOLDER [--tta]
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from monai.inferers import sliding_window_inference
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans


def load_network(model: Path, fold: str) -> tuple[torch.nn.Module, dict, dict]:
    """nnU-Net's 3d_fullres network with the fold's final weights, its configuration and the CT statistics."""
    plans = json.loads((model / "plans.json").read_text())
    classes = len(json.loads((model / "dataset.json").read_text())["labels"])
    config = plans["configurations"]["3d_fullres"]
    architecture = config["architecture"]
    network = get_network_from_plans(architecture["network_class_name"], architecture["arch_kwargs"],
                                     architecture["_kw_requires_import"], 1, classes, deep_supervision=False)
    checkpoint = torch.load(model / f"fold_{fold}" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    network.load_state_dict(checkpoint["network_weights"])
    return network.eval(), config, plans["foreground_intensity_properties_per_channel"]["0"]


def segment(network: torch.nn.Module, volume: torch.Tensor, patch: list[int], tta: bool) -> np.ndarray:
    """Argmax labels (z, y, x) of a normalised volume (1, 1, z, y, x)."""
    def window(x: torch.Tensor) -> torch.Tensor:
        return sliding_window_inference(x, patch, 1, network, overlap=0.5, mode="gaussian", sigma_scale=0.125,
                                        padding_mode="constant")

    with torch.inference_mode():
        logits = window(volume)
        if tta:
            flips = [combo for n in (1, 2, 3) for combo in itertools.combinations((2, 3, 4), n)]
            for axes in flips:
                logits += torch.flip(window(torch.flip(volume, axes)), axes)
            logits /= len(flips) + 1
        return logits[0].argmax(0).to(torch.uint8).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("fold")
    parser.add_argument("inputs", type=Path)
    parser.add_argument("outputs", type=Path)
    parser.add_argument("--tta", action="store_true")
    args = parser.parse_args()
    network, config, stats = load_network(args.model, args.fold)
    args.outputs.mkdir(parents=True, exist_ok=True)
    for image_file in sorted(args.inputs.glob("*_0000.nii.gz")):
        image = sitk.ReadImage(str(image_file))
        spacing = list(reversed(image.GetSpacing()))
        if not np.allclose(spacing, config["spacing"], rtol=1e-4):
            raise SystemExit(f"{image_file}: spacing {spacing}, not the plan's {config['spacing']} (no resampling)")
        array = sitk.GetArrayFromImage(image).astype(np.float32)
        np.clip(array, stats["percentile_00_5"], stats["percentile_99_5"], out=array)
        array = (array - stats["mean"]) / max(stats["std"], 1e-8)
        labels = segment(network, torch.from_numpy(array)[None, None], config["patch_size"], args.tta)
        output = sitk.GetImageFromArray(labels)
        output.CopyInformation(image)
        sitk.WriteImage(output, str(args.outputs / image_file.name.replace("_0000.nii.gz", ".nii.gz")), True)


if __name__ == "__main__":
    main()
