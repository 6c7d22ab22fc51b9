"""Numerical parity of pcaa_hf with the authors' PCAA code (GitHub lsa1997/PCAA), which is NOT part of this project.

`ParityCheck(checkout)` imports their code from a checkout of that repository. For each configuration of
`CONFIGURATIONS`, the authors' `Seg_Model` (PCAA, `networks/caanet.py`, or a baseline of `networks/` that their
train.py's --model names, with its loss) is built with random weights and randomised BatchNorm statistics, saved as
a DistributedDataParallel-style checkpoint (`module.` prefix), converted with `convert_original_checkpoint`, reloaded
from the written folder, and both models are run (in eval mode unless the configuration says `training`) on the same
random images and label maps. Each output
(the logits, the region class scores and each loss term) gets a `ParityRow`: the relative error of ours against
theirs (max |ours - theirs| / max |theirs|), failed above `tolerance` (float64) or, below float64, where our rounding
error exceeds `rounding_ratio` times theirs.

Both models run in float64 by default: the randomised networks amplify float32 rounding differences (pcaa_hf runs
CPU inference channels-last, where oneDNN sums in another order) by orders of magnitude, while in float64 any
difference in the functions computed stands out above 1e-10. In float32 both run in float32 and the authors' model
also in float64, and the rounding error each code makes is measured against that reference: ours passes when its
error is at most `rounding_ratio` times theirs.
"""

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from pcaa_hf.conversion.original_checkpoints import ORIGINAL_MODELS, convert_original_checkpoint, import_original

DEFAULT_TOLERANCE = 1e-6
# These randomised networks amplify rounding (errors of 1e-1 of the largest logit in float32), and the errors of
# either code move by 2x between runs of the same command: a ratio, not a bound, with room for that.
DEFAULT_ROUNDING_RATIO = 4.0
# Outputs that both round exactly (a loss of constant inputs) get this floor, not a ratio of zeros.
ROUNDING_FLOOR = 1e-6

# Each configuration: the authors' --model (caanet when not given), backbone, classes, PCAA region grids, --multi-grid,
# --dropout, --aux-loss (True when not given; their ocrnet always has the auxiliary head), input size and --ohem;
# `training`: both models in training mode (BatchNorm on batch statistics), else eval mode. The baselines run on
# smaller inputs of sizes no output stride divides: their heads, like PCAA's, take any size.
CONFIGURATIONS = {
    "r50-cityscapes": dict(backbone="resnet50", num_labels=19, bins=[(4, 4)], multi_grid=False, dropout=False,
                           size=(512, 1024), ohem=False),
    "r50-cityscapes-ohem": dict(backbone="resnet50", num_labels=19, bins=[(4, 4)], multi_grid=False, dropout=False,
                                size=(512, 1024), ohem=True),
    "r101-ade20k-multigrid": dict(backbone="resnet101", num_labels=150, bins=[(4, 4)], multi_grid=True,
                                  dropout=False, size=(512, 512), ohem=False),
    "r50-bins-2x2-4x4-dropout": dict(backbone="resnet50", num_labels=19, bins=[(2, 2), (4, 4)], multi_grid=False,
                                     dropout=True, size=(512, 512), ohem=False),
    "r50-basenet": dict(model="basenet", backbone="resnet50", num_labels=19, multi_grid=False, dropout=False,
                        size=(257, 385), ohem=False),
    "r50-basenet-dropout-no-auxiliary": dict(model="basenet", backbone="resnet50", num_labels=19, multi_grid=False,
                                             dropout=True, auxiliary_head=False, size=(250, 330), ohem=False),
    "r50-deeplabv3": dict(model="deeplabv3", backbone="resnet50", num_labels=19, multi_grid=False, dropout=False,
                          size=(257, 385), ohem=False),
    "r50-deeplabv3-dropout-no-auxiliary-ohem": dict(model="deeplabv3", backbone="resnet50", num_labels=19,
                                                    multi_grid=False, dropout=True, auxiliary_head=False,
                                                    size=(250, 330), ohem=True),
    "r50-nlnet": dict(model="nlnet", backbone="resnet50", num_labels=19, multi_grid=False, dropout=False,
                      size=(257, 385), ohem=False),
    "r50-nlnet-dropout-no-auxiliary": dict(model="nlnet", backbone="resnet50", num_labels=19, multi_grid=False,
                                           dropout=True, auxiliary_head=False, size=(250, 330), ohem=False),
    "r50-ocrnet": dict(model="ocrnet", backbone="resnet50", num_labels=19, multi_grid=False, dropout=False,
                       size=(257, 385), ohem=False),
    "r101-ocrnet-multigrid-dropout-ohem": dict(model="ocrnet", backbone="resnet101", num_labels=150, multi_grid=True,
                                               dropout=True, size=(250, 330), ohem=True),
    "r50-ocrnet-no-aux-loss": dict(model="ocrnet", backbone="resnet50", num_labels=19, multi_grid=False,
                                   dropout=False, auxiliary_head=False, size=(250, 330), ohem=False),
    # Training mode where BatchNorm normalises the heads' smallest maps: ASPP's pooled (B, C, 1, 1) branch, OCR's
    # (B, C, K, 1) object representations.
    "r50-deeplabv3-training": dict(model="deeplabv3", backbone="resnet50", num_labels=19, multi_grid=False,
                                   dropout=False, size=(250, 330), ohem=False, training=True),
    "r50-ocrnet-training": dict(model="ocrnet", backbone="resnet50", num_labels=19, multi_grid=False, dropout=False,
                                size=(250, 330), ohem=False, training=True),
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
    """{name: tensor}, one naming for both codes' outputs; the ones a model does not have (None) are left out."""
    outputs = {"logits": logits}
    outputs.update({f"region_class_scores[{i}]": score for i, score in enumerate(region_class_scores or ())})
    outputs.update(segmentation_loss=segmentation_loss, auxiliary_loss=auxiliary_loss, region_loss=region_loss,
                   loss=loss)
    return {name: value for name, value in outputs.items() if value is not None}


def authors_onehot_labels(labels, num_labels, dtype):
    """
    The one-hot label maps (N, num_labels, H, W) that the authors' data loader makes beside the label maps (N, H, W)
    for their region loss (`--onehot`); ignored pixels (255) are zero in every class.
    """
    return torch.stack([(labels == k) for k in range(num_labels)], dim=1).to(dtype)


def authors_model(networks, criterion_module, settings):
    """The authors' `Seg_Model` of `settings["model"]` with the loss their train.py gives it (`get_loss`)."""
    model = settings.get("model", "caanet")
    if model == "caanet":
        criterion = criterion_module.JointClsLoss(ignore_index=255, bins=settings["bins"], ohem=settings["ohem"])
        head_settings = dict(bins=settings["bins"])
    else:
        criterion = criterion_module.DSNLoss(ignore_index=255, ohem=settings["ohem"])
        head_settings = {}
    return networks[model].Seg_Model(num_classes=settings["num_labels"], criterion=criterion,
                                     backbone=settings["backbone"], multi_grid=settings["multi_grid"],
                                     aux_loss=settings.get("auxiliary_head", True), dropout=settings["dropout"],
                                     **head_settings)


def authors_outputs(theirs, pixel_values, labels, num_labels):
    """`named_outputs` of the authors' model: logits, region class scores (PCAA), loss terms."""
    with torch.no_grad():
        outputs = theirs(pixel_values)
        if isinstance(outputs[-1], list):  # PCAA: [logits, region class scores], a loss needing one-hot labels
            losses = theirs(pixel_values, labels, authors_onehot_labels(labels, num_labels, pixel_values.dtype))
            return named_outputs(outputs[0], outputs[1], losses["seg_loss"], losses["aux_loss"], losses["cls_loss"],
                                 losses["total_loss"])
        losses = theirs(pixel_values, labels)
    # DSNLoss: the segmentation and auxiliary terms with an auxiliary head, else the total alone.
    return named_outputs(outputs[0], None, losses.get("seg_loss", losses["total_loss"]), losses.get("aux_loss"), None,
                         losses["total_loss"])


def our_outputs(ours, pixel_values, labels):
    """`named_outputs` of ours."""
    with torch.no_grad():
        output = ours(pixel_values, labels=labels)
    return named_outputs(output.logits, output.region_class_scores, output.segmentation_loss, output.auxiliary_loss,
                         output.region_loss, output.loss)


def compare(networks, criterion_module, name, settings, workdir, seed, dtype):
    """
    Rows (name, error of ours against theirs, max |theirs|, ours' and theirs' error against the authors' model in
    float64); the last two only below float64 (else None): the rounding error each code makes.
    """
    generator = torch.Generator().manual_seed(seed)
    theirs = authors_model(networks, criterion_module, settings)
    randomise(theirs, generator)
    checkpoint = Path(workdir) / f"{name}.pth"
    torch.save({f"module.{key}": value for key, value in theirs.state_dict().items()}, checkpoint)
    ours = convert_original_checkpoint(checkpoint, Path(workdir) / name, settings["backbone"], settings["num_labels"],
                                       settings.get("bins", [(4, 4)]), multi_grid=settings["multi_grid"],
                                       dropout=settings["dropout"], original_model=settings.get("model", "caanet"))
    ours.config.use_ohem = settings["ohem"]
    if settings.get("training"):
        theirs.train()
        ours.train()
    pixel_values = torch.randn(2, 3, *settings["size"], generator=generator)
    labels = random_label_map(2, settings["size"], settings["num_labels"], generator)
    reference = None
    if dtype != torch.float64:
        reference = authors_outputs(theirs.to(torch.float64), pixel_values.to(torch.float64), labels,
                                    settings["num_labels"])
    their_values = authors_outputs(theirs.to(dtype), pixel_values.to(dtype), labels, settings["num_labels"])
    our_values = our_outputs(ours.to(dtype), pixel_values.to(dtype), labels)
    if set(our_values) != set(their_values):
        raise AssertionError(f"{name}: ours has the outputs {sorted(our_values)}, theirs {sorted(their_values)}.")
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


@dataclass(frozen=True)
class ParityRow:
    """
    One output of one configuration: `error`, the relative error of ours against theirs; `scale`, max |theirs|;
    below float64, `our_rounding` and `their_rounding`, each code's relative error against the authors' model in
    float64 (else None); `failed`, whether the comparison's rule refuses it.
    """

    configuration: str
    output: str
    error: float
    scale: float
    our_rounding: float | None
    their_rounding: float | None
    failed: bool


class ParityCheck:
    """
    Compares converted models with the authors' (imported once from the checkout `original`) in `dtype`, on inputs
    drawn from `seed`: `compare(name)` one configuration, `run()` all of them, `summary(rows)` the verdict line.
    """

    def __init__(self, original, dtype=torch.float64, seed=0, tolerance=DEFAULT_TOLERANCE,
                 rounding_ratio=DEFAULT_ROUNDING_RATIO):
        *modules, self.criterion_module = import_original(
            original, (*(f"networks.{model}" for model in ORIGINAL_MODELS), "loss.criterion")
        )
        self.networks = dict(zip(ORIGINAL_MODELS, modules))
        self.dtype, self.seed, self.tolerance, self.rounding_ratio = dtype, seed, tolerance, rounding_ratio

    def failed(self, error, our_rounding, their_rounding):
        # Written as "not within" so that a NaN fails.
        if our_rounding is None:
            return not error <= self.tolerance
        return not our_rounding <= self.rounding_ratio * their_rounding + ROUNDING_FLOOR

    def compare(self, name):
        """The `ParityRow`s of configuration `name`."""
        with tempfile.TemporaryDirectory() as workdir:
            rows = compare(self.networks, self.criterion_module, name, CONFIGURATIONS[name], workdir, self.seed,
                           self.dtype)
        return [ParityRow(name, output, error, scale, our_rounding, their_rounding,
                          self.failed(error, our_rounding, their_rounding))
                for output, error, scale, our_rounding, their_rounding in rows]

    def run(self, names=None):
        """The `ParityRow`s of the configurations `names` (default: all)."""
        return [row for name in (names or sorted(CONFIGURATIONS)) for row in self.compare(name)]

    def summary(self, rows):
        """"PASS: ..." or "FAIL: ...": the rule applied and the outputs that failed it."""
        failures = [f"{row.configuration} {row.output}" for row in rows if row.failed]
        if self.dtype == torch.float64:
            worst = max((row.error for row in rows), default=0.0,
                        key=lambda value: math.inf if math.isnan(value) else value)
            rule = f"largest relative error {worst:.2e} (tolerance {self.tolerance:.0e})"
        else:
            rule = f"our rounding error at most {self.rounding_ratio:g}x the authors' (+1e-6)"
        return f"{'FAIL' if failures else 'PASS'}: {rule}" + (f"; failed: {', '.join(failures)}" if failures else "")


__all__ = ["CONFIGURATIONS", "ParityCheck", "ParityRow", "compare"]
