"""Check that autoseg's training step computes what nnU-Net v2's does: same weights, same batches.

Usage (with the python of a separate venv holding nnunetv2==2.8.1 and autoseg's dependencies; the
repository root is put on sys.path, so autoseg need not be installed there):
    autoseg plan 4 && autoseg preprocess 4 -c 3d_fullres
    /path/to/nnunet-venv/bin/python benchmarks/check_nnunet_step.py [--preprocessed FOLDER] [--steps 10]

nnU-Net's PlainConvUNet is built from autoseg's plan with nnU-Net's He init; its weights are copied
into autoseg's U-Net tensor by tensor (encoder stage s <-> stage s; nnU-Net's decoder stage k, lowest
resolution first, <-> autoseg's decoder level n_stages - 2 - k). Then both take --steps SGD steps
(Nesterov, momentum 0.99, lr 1e-2, weight decay 3e-5, gradient norm clipped at 12) on the same real
batches from autoseg's loader: nnU-Net's DeepSupervisionWrapper(DC_and_CE_loss(MemoryEfficientSoftDiceLoss))
against autoseg's DeepSupervisionLoss(DiceCELoss). nnU-Net's loss is CE - Dice, autoseg's CE + 1 - Dice
(the same gradient). Exit status 1 if the losses or weights drift apart beyond float32 round-off.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dynamic_network_architectures.architectures.unet import PlainConvUNet  # noqa: E402
from dynamic_network_architectures.initialization.weight_init import InitWeights_He  # noqa: E402
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss  # noqa: E402
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper  # noqa: E402
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss  # noqa: E402

from autoseg.model.build import build_network  # noqa: E402
from autoseg.planning.contract import Plans  # noqa: E402
from autoseg.serialization import load_contract  # noqa: E402
from autoseg.training.data import make_loader  # noqa: E402
from autoseg.training.loss import DeepSupervisionLoss, DiceCELoss, deep_supervision_weights  # noqa: E402

LOSS_TOLERANCE, WEIGHT_TOLERANCE = 1e-4, 1e-4


def nnunet_network(topology, in_channels: int, num_classes: int) -> torch.nn.Module:
    conv = torch.nn.Conv3d if topology.dim == 3 else torch.nn.Conv2d
    norm = torch.nn.InstanceNorm3d if topology.dim == 3 else torch.nn.InstanceNorm2d
    net = PlainConvUNet(in_channels, topology.n_stages, list(topology.features_per_stage), conv,
                        [list(k) for k in topology.kernel_sizes], [list(s) for s in topology.strides],
                        list(topology.convs_per_stage), num_classes, list(topology.convs_per_decoder_stage),
                        conv_bias=True, norm_op=norm, norm_op_kwargs={"eps": 1e-5, "affine": True},
                        nonlin=torch.nn.LeakyReLU, nonlin_kwargs={"inplace": True}, deep_supervision=True)
    net.apply(InitWeights_He(1e-2))
    return net


def module_pairs(theirs: torch.nn.Module, ours: torch.nn.Module):
    """(nnU-Net module, autoseg module) for every conv, norm, transposed conv and head."""
    n_stages = len(ours.encoder.stages)
    for s in range(n_stages):
        for i, block in enumerate(theirs.encoder.stages[s][0].convs):
            yield block.conv, ours.encoder.stages[s][i].conv
            yield block.norm, ours.encoder.stages[s][i].norm
    for k in range(n_stages - 1):
        level = n_stages - 2 - k
        yield theirs.decoder.transpconvs[k], ours.decoder[level].up.conv
        for i, block in enumerate(theirs.decoder.stages[k].convs):
            yield block.conv, ours.decoder[level].convs[i].conv
            yield block.norm, ours.decoder[level].convs[i].norm
        yield theirs.decoder.seg_layers[k], ours.decoder[level].head


def copy_weights(theirs: torch.nn.Module, ours: torch.nn.Module) -> int:
    copied = 0
    with torch.no_grad():
        for a, b in module_pairs(theirs, ours):
            for name in ("weight", "bias"):
                getattr(b, name).copy_(getattr(a, name))
                copied += getattr(a, name).numel()
    return copied


def largest_weight_gap(theirs: torch.nn.Module, ours: torch.nn.Module) -> float:
    return max((getattr(a, n) - getattr(b, n)).abs().max().item()
               for a, b in module_pairs(theirs, ours) for n in ("weight", "bias"))


def step(net, loss_fn, optimizer, data, targets) -> tuple[float, float]:
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn(net(data), targets)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(net.parameters(), 12.0)
    optimizer.step()
    return float(loss.detach()), float(norm)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default = Path(os.environ.get("AUTOSEG_PREPROCESSED", "preprocessed")) / "Dataset004_Hippocampus"
    parser.add_argument("--preprocessed", type=Path, default=default)
    parser.add_argument("--configuration", default="3d_fullres")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    plans = load_contract(args.preprocessed / "plans.json", Plans, rerun="autoseg plan")
    config = plans.configurations[args.configuration]
    cache = args.preprocessed / config.data_id
    cases = sorted(p.stem for p in cache.glob("*.json"))
    num_classes, channels = plans.num_classes, len(plans.channel_names)
    torch.manual_seed(args.seed)
    theirs = nnunet_network(config.topology, channels, num_classes)
    ours = build_network(config.topology, in_channels=channels, num_classes=num_classes)
    print(f"parameters: nnU-Net {sum(p.numel() for p in theirs.parameters()):,}, "
          f"autoseg {sum(p.numel() for p in ours.parameters()):,}; copied {copy_weights(theirs, ours):,}")

    n_out = config.topology.n_stages - 1
    weights = np.asarray(deep_supervision_weights(n_out))
    dice_ce = DC_and_CE_loss({"batch_dice": config.batch_dice, "smooth": 1e-5, "do_bg": False, "ddp": False}, {},
                             weight_ce=1, weight_dice=1, ignore_label=None, dice_class=MemoryEfficientSoftDiceLoss)
    ours_loss = DeepSupervisionLoss(DiceCELoss(batch_dice=config.batch_dice), n_out)
    losses = (DeepSupervisionWrapper(dice_ce, weights), ours_loss)
    optimizers = [torch.optim.SGD(n.parameters(), lr=1e-2, momentum=0.99, nesterov=True, weight_decay=3e-5)
                  for n in (theirs, ours)]
    worst_loss = worst_weight = 0.0
    with make_loader(cache, cases, config, workers=0, seed=args.seed) as loader:
        for i, batch in zip(range(args.steps), loader):
            data = torch.from_numpy(batch["data"])
            targets = [torch.from_numpy(t).long() for t in batch["target"]]
            (l_theirs, g_theirs), (l_ours, g_ours) = (step(n, f, o, data, targets)
                                                      for n, f, o in zip((theirs, ours), losses, optimizers))
            gap = largest_weight_gap(theirs, ours)
            worst_loss, worst_weight = max(worst_loss, abs(l_theirs - (l_ours - 1.0))), max(worst_weight, gap)
            print(f"step {i + 1:3d}: loss nnU-Net {l_theirs:+.6f} autoseg-1 {l_ours - 1:+.6f}  grad norm "
                  f"{g_theirs:.5f} {g_ours:.5f}  largest weight gap {gap:.1e}")
    same = worst_loss < LOSS_TOLERANCE and worst_weight < WEIGHT_TOLERANCE
    verdict = "SAME" if same else "DIFFERENT"
    print(f"{verdict}: largest loss gap {worst_loss:.1e}, largest weight gap {worst_weight:.1e}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
