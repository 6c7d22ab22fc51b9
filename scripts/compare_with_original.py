#!/usr/bin/env python
"""Numerical parity of pcaa_hf with the authors' PCAA code (GitHub lsa1997/PCAA), which is NOT part of this project.

Point --original at a checkout of that repository. For each configuration, the authors' `Seg_Model` is built with
random weights and randomised BatchNorm statistics, saved as a DistributedDataParallel-style checkpoint (`module.`
prefix), converted with scripts/convert_original_pcaa.py's code, reloaded from the written folder, and both models are
run in eval mode on the same random images and label maps. Prints the relative error (max |ours - theirs| /
max |theirs|) of the logits, the region class scores and each loss term, and exits non-zero above --tolerance
(float64) or where our rounding error exceeds --rounding-ratio times theirs (float32, below).

Both models run in float64 by default: the randomised networks amplify float32 rounding differences (pcaa_hf runs
CPU inference channels-last, where oneDNN sums in another order) by orders of magnitude, while in float64 any
difference in the functions computed stands out above 1e-10. `--dtype float32` runs both in float32 and also the
authors' model in float64, and compares the rounding error each code makes against that reference: ours passes when
its error is at most --rounding-ratio times theirs.
"""

import argparse
import math
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


def named_outputs(logits, region_class_scores, segmentation_loss, auxiliary_loss, region_loss, loss):
    """{name: tensor}, one naming for both codes' outputs."""
    outputs = {"logits": logits}
    outputs.update({f"region_class_scores[{i}]": score for i, score in enumerate(region_class_scores)})
    outputs.update(segmentation_loss=segmentation_loss, auxiliary_loss=auxiliary_loss, region_loss=region_loss,
                   loss=loss)
    return outputs


def authors_outputs(theirs, pixel_values, labels, num_labels):
    """`named_outputs` of the authors' model: logits, region class scores, loss terms."""
    labels_onehot = torch.stack([(labels == k) for k in range(num_labels)], dim=1).to(pixel_values.dtype)
    with torch.no_grad():
        logits, scores = theirs(pixel_values)
        losses = theirs(pixel_values, labels, labels_onehot)
    return named_outputs(logits, scores, losses["seg_loss"], losses["aux_loss"], losses["cls_loss"],
                         losses["total_loss"])


def our_outputs(ours, pixel_values, labels):
    """`named_outputs` of ours."""
    with torch.no_grad():
        output = ours(pixel_values, labels=labels)
    return named_outputs(output.logits, output.region_class_scores, output.segmentation_loss, output.auxiliary_loss,
                         output.region_loss, output.loss)


def compare(caanet, criterion_module, name, settings, workdir, seed, dtype):
    """
    Rows (name, error of ours against theirs, max |theirs|, ours' and theirs' error against the authors' model in
    float64); the last two only below float64 (else None): the rounding error each code makes.
    """
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
    pixel_values = torch.randn(2, 3, *settings["size"], generator=generator)
    labels = random_label_map(2, settings["size"], settings["num_labels"], generator)
    reference = None
    if dtype != torch.float64:
        reference = authors_outputs(theirs.to(torch.float64), pixel_values.to(torch.float64), labels,
                                    settings["num_labels"])
    their_values = authors_outputs(theirs.to(dtype), pixel_values.to(dtype), labels, settings["num_labels"])
    our_values = our_outputs(ours.to(dtype), pixel_values.to(dtype), labels)
    rows = []
    for output_name, their_value in their_values.items():
        our_value = our_values[output_name]
        our_rounding = their_rounding = None
        if reference is not None:
            our_rounding = relative_error(our_value, reference[output_name])
            their_rounding = relative_error(their_value, reference[output_name])
        rows.append((output_name, relative_error(our_value, their_value), their_value.abs().max().item(),
                     our_rounding, their_rounding))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--original", required=True, type=Path, help="checkout of GitHub lsa1997/PCAA")
    parser.add_argument("--configs", nargs="+", choices=sorted(CONFIGURATIONS), default=sorted(CONFIGURATIONS))
    parser.add_argument("--tolerance", type=float,
                        help="float64: largest relative error accepted (default: 1e-6)")
    # These randomised networks amplify rounding (errors of 1e-1 of the largest logit in float32), and the errors of
    # either code move by 2x between runs of the same command: a ratio, not a bound, with room for that.
    parser.add_argument("--rounding-ratio", type=float, default=4.0,
                        help="float32: largest ratio of our rounding error to the authors' (default: 4)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=["float64", "float32"], default="float64", help="precision of both models")
    args = parser.parse_args(argv)
    if args.dtype == "float32" and args.tolerance is not None:
        parser.error("--tolerance bounds the float64 comparison; in float32, --rounding-ratio decides")
    if args.tolerance is None:
        args.tolerance = 1e-6
    if not (args.original / "networks" / "caanet.py").is_file():
        parser.error(f"{args.original} is not a checkout of lsa1997/PCAA (networks/caanet.py is missing)")
    caanet, criterion_module = import_original(args.original)
    failures, worst = [], 0.0
    with tempfile.TemporaryDirectory() as workdir:
        for name in args.configs:
            settings = CONFIGURATIONS[name]
            print(f"{name}: {settings['backbone']}, {settings['num_labels']} classes, bins {settings['bins']}, "
                  f"multi-grid {settings['multi_grid']}, dropout {settings['dropout']}, OHEM {settings['ohem']}, "
                  f"input 2x3x{settings['size'][0]}x{settings['size'][1]}, {args.dtype}")
            rows = compare(caanet, criterion_module, name, settings, workdir, args.seed, getattr(torch, args.dtype))
            for output_name, error, scale, our_rounding, their_rounding in rows:
                worst = max(worst, error, key=lambda value: math.inf if math.isnan(value) else value)
                line = f"  {output_name:24s} relative error {error:.2e}   (max |theirs| {scale:.4g})"
                # Written as "not within" so that a NaN fails.
                if our_rounding is None:
                    failed = not error <= args.tolerance
                else:
                    # Outputs that both round exactly (a loss of constant inputs) get a floor, not a ratio of zeros.
                    failed = not our_rounding <= args.rounding_ratio * their_rounding + 1e-6
                    line += f"   against float64: ours {our_rounding:.2e}, theirs {their_rounding:.2e}"
                print(line)
                if failed:
                    failures.append(f"{name} {output_name}")
    if args.dtype == "float64":
        rule = f"largest relative error {worst:.2e} (tolerance {args.tolerance:.0e})"
    else:
        rule = f"our rounding error at most {args.rounding_ratio:g}x the authors' (+1e-6)"
    print(f"{'FAIL' if failures else 'PASS'}: {rule}" + (f"; failed: {', '.join(failures)}" if failures else ""))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
