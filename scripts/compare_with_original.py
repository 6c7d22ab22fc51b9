#!/usr/bin/env python
"""Numerical parity of pcaa_hf with the authors' PCAA code (GitHub lsa1997/PCAA), which is NOT part of this project.

Point --original at a checkout of that repository. For each configuration, the authors' `Seg_Model` is built with
random weights and randomised BatchNorm statistics, saved as a DistributedDataParallel-style checkpoint (`module.`
prefix), converted with scripts/convert_original_pcaa.py's code, reloaded from the written folder, and both models are
run in eval mode on the same random images and label maps. Prints the relative error (max |ours - theirs| /
max |theirs|) of the logits, the region class scores and each loss term, and exits non-zero above --tolerance.

Both models run in float64 by default: the randomised networks amplify float32 rounding differences (pcaa_hf runs
CPU inference channels-last, where oneDNN sums in another order) by orders of magnitude, while in float64 any
difference in the functions computed stands out above 1e-10. `--dtype float32` shows the float32 figures.
"""

import argparse
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from pcaa_hf.convert_original import convert_original_checkpoint, import_original

CONFIGURATIONS = {
    "r50-cityscapes": dict(backbone="resnet50", num_labels=19, bins=[(4, 4)], multi_grid=False, dropout=False,
                           size=(512, 1024), ohem=False),
    "r50-cityscapes-ohem": dict(backbone="resnet50", num_labels=19, bins=[(4, 4)], multi_grid=False, dropout=False,
                                size=(512, 1024), ohem=True),
    "r101-ade20k-multigrid": dict(backbone="resnet101", num_labels=150, bins=[(4, 4)], multi_grid=True,
                                  dropout=False, size=(512, 512), ohem=False),
    "r50-bins-2x2-4x4-dropout": dict(backbone="resnet50", num_labels=19, bins=[(2, 2), (4, 4)], multi_grid=False,
                                     dropout=True, size=(512, 512), ohem=False),
}


@torch.no_grad()
def randomise(model, generator):
    """
    Random weights and BatchNorm statistics that keep activations O(1): Kaiming-normal weights, random BatchNorm affine
    parameters, running statistics measured on a random batch (momentum 1) and then randomly perturbed.
    """
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for name, tensor in model.named_parameters():
        if tensor.ndim > 1:
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * (2.0 / tensor[0].numel()) ** 0.5)
        elif name.endswith("weight"):
            tensor.copy_(torch.rand(tensor.shape, generator=generator) * 0.5 + 0.75)
        else:
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.1)
    for norm in norms:
        norm.momentum = 1.0
    model.train()
    model(torch.randn(2, 3, 256, 256, generator=generator))
    for norm in norms:
        norm.momentum = 0.1
        norm.running_mean.add_(torch.randn(norm.running_mean.shape, generator=generator) * 0.1)
        norm.running_var.mul_(torch.rand(norm.running_var.shape, generator=generator) * 0.4 + 0.8)
    model.eval()


def random_label_map(batch, size, num_labels, generator):
    """Blocky label maps: coarse random classes, a few sparse pixels of others (fractions < 1 %), an ignored band."""
    height, width = size
    coarse = torch.randint(0, num_labels, (batch, 1, 8, 16), generator=generator).float()
    labels = F.interpolate(coarse, size=size, mode="nearest").long()[:, 0]
    sparse = torch.rand(batch, height, width, generator=generator) < 0.002
    labels[sparse] = torch.randint(0, num_labels, (int(sparse.sum()),), generator=generator)
    labels[:, height // 3: height // 3 + 24] = 255
    return labels


def relative_error(ours, theirs):
    return ((ours.double() - theirs.double()).abs().max() / theirs.double().abs().max().clamp(min=1e-12)).item()


def compare(caanet, criterion_module, name, settings, workdir, seed, dtype):
    generator = torch.Generator().manual_seed(seed)
    criterion = criterion_module.JointClsLoss(ignore_index=255, bins=settings["bins"], ohem=settings["ohem"])
    theirs = caanet.Seg_Model(num_classes=settings["num_labels"], criterion=criterion, backbone=settings["backbone"],
                              multi_grid=settings["multi_grid"], bins=settings["bins"], aux_loss=True,
                              dropout=settings["dropout"])
    randomise(theirs, generator)

    checkpoint = Path(workdir) / f"{name}.pth"
    torch.save({f"module.{key}": value for key, value in theirs.state_dict().items()}, checkpoint)
    ours = convert_original_checkpoint(checkpoint, Path(workdir) / name, settings["backbone"], settings["num_labels"],
                                       settings["bins"], multi_grid=settings["multi_grid"],
                                       dropout=settings["dropout"])
    ours.config.use_ohem = settings["ohem"]
    theirs.to(dtype)
    ours.to(dtype)

    pixel_values = torch.randn(2, 3, *settings["size"], generator=generator).to(dtype)
    labels = random_label_map(2, settings["size"], settings["num_labels"], generator)
    labels_onehot = torch.stack([(labels == k) for k in range(settings["num_labels"])], dim=1).to(dtype)
    with torch.no_grad():
        their_logits, their_scores = theirs(pixel_values)
        their_losses = theirs(pixel_values, labels, labels_onehot)
        outputs = ours(pixel_values, labels=labels)

    rows = [("logits", outputs.logits, their_logits)]
    rows += [(f"region_class_scores[{i}]", ours_s, theirs_s)
             for i, (ours_s, theirs_s) in enumerate(zip(outputs.region_class_scores, their_scores))]
    rows += [("segmentation_loss", outputs.segmentation_loss, their_losses["seg_loss"]),
             ("auxiliary_loss", outputs.auxiliary_loss, their_losses["aux_loss"]),
             ("region_loss", outputs.region_loss, their_losses["cls_loss"]),
             ("loss", outputs.loss, their_losses["total_loss"])]
    return [(label, relative_error(a, b), b.abs().max().item()) for label, a, b in rows]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--original", required=True, type=Path, help="checkout of GitHub lsa1997/PCAA")
    parser.add_argument("--configs", nargs="+", choices=sorted(CONFIGURATIONS), default=sorted(CONFIGURATIONS))
    parser.add_argument("--tolerance", type=float,
                        help="largest relative error accepted (default: 1e-6 in float64, 1e-2 in float32)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=["float64", "float32"], default="float64", help="precision of both models")
    args = parser.parse_args(argv)
    if args.tolerance is None:
        args.tolerance = 1e-6 if args.dtype == "float64" else 1e-2
    if not (args.original / "networks" / "caanet.py").is_file():
        parser.error(f"{args.original} is not a checkout of lsa1997/PCAA (networks/caanet.py is missing)")

    caanet, criterion_module = import_original(args.original)
    worst = 0.0
    with tempfile.TemporaryDirectory() as workdir:
        for name in args.configs:
            settings = CONFIGURATIONS[name]
            print(f"{name}: {settings['backbone']}, {settings['num_labels']} classes, bins {settings['bins']}, "
                  f"multi-grid {settings['multi_grid']}, dropout {settings['dropout']}, OHEM {settings['ohem']}, "
                  f"input 2x3x{settings['size'][0]}x{settings['size'][1]}, {args.dtype}")
            rows = compare(caanet, criterion_module, name, settings, workdir, args.seed, getattr(torch, args.dtype))
            for label, error, scale in rows:
                worst = max(worst, error)
                print(f"  {label:24s} relative error {error:.2e}   (max |theirs| {scale:.4g})")
    verdict = "PASS" if worst <= args.tolerance else "FAIL"
    print(f"{verdict}: largest relative error {worst:.2e} (tolerance {args.tolerance:.0e})")
    return 0 if worst <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
