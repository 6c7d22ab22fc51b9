"""One end-to-end PCAA training step on a real-size random input, with a report of what it did.

Builds the paper's Cityscapes model (dilated ResNet-50 v1c, output stride 8, one PCAA module with 4x4 bins, auxiliary
head; random weights), runs forward + backward + one SGD step (momentum 0.9, weight decay 1e-4) on a random 768x768
crop with a blocky label map, and prints the shapes, every loss term, the time of each phase and the peak memory.
"""

import logging
import resource
import time

import torch
import torch.nn.functional as F

from pcaa_hf.cli.arguments import ArgumentParser
from pcaa_hf.model.configuration_pcaa import BACKBONE_DEPTHS, PCAAConfig
from pcaa_hf.model.modeling_pcaa import PCAAForSemanticSegmentation
from pcaa_hf.utils.process_settings import configure_cpu_process

logger = logging.getLogger("forward_backward")


def blocky_labels(batch, height, width, num_labels, ignore_index, generator):
    """Label maps made of 32x32-pixel blocks of random classes, with about 10 % of blocks ignored."""
    coarse = torch.randint(0, num_labels, (batch, 1, -(-height // 32), -(-width // 32)), generator=generator)
    ignored = torch.rand(coarse.shape, generator=generator) < 0.1
    coarse = coarse.masked_fill(ignored, ignore_index).float()
    return F.interpolate(coarse, scale_factor=32, mode="nearest")[:, 0, :height, :width].long()


def peak_memory_gib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main(argv=None):
    configure_cpu_process()
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--backbone_depth", type=int, default=50, choices=BACKBONE_DEPTHS)
    parser.add_argument("--num_labels", type=int, default=19)
    parser.add_argument("--height", type=int, default=768)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")

    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    config = PCAAConfig(backbone_depth=args.backbone_depth, num_labels=args.num_labels)
    model = PCAAForSemanticSegmentation(config).train()
    parameters = sum(p.numel() for p in model.parameters())
    logger.info("Built PCAA: ResNet-%d v1c, output stride %d, bins %s, %d classes, %.1fM parameters",
                config.backbone_depth, config.output_stride, [tuple(g) for g in config.bins], config.num_labels,
                parameters / 1e6)

    pixel_values = torch.randn(args.batch_size, 3, args.height, args.width, generator=generator)
    labels = blocky_labels(args.batch_size, args.height, args.width, config.num_labels, config.loss_ignore_index,
                           generator)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    logger.info("Input %s, labels %s (%.1f %% ignored), %d CPU threads", tuple(pixel_values.shape),
                tuple(labels.shape), 100 * (labels == config.loss_ignore_index).float().mean().item(),
                torch.get_num_threads())

    start = time.perf_counter()
    outputs = model(pixel_values, labels=labels)
    forward_seconds = time.perf_counter() - start
    logger.info("Forward: %.1f s", forward_seconds)
    start = time.perf_counter()
    outputs.loss.backward()
    backward_seconds = time.perf_counter() - start
    logger.info("Backward: %.1f s", backward_seconds)
    optimizer.step()
    optimizer.zero_grad()


    print()
    print(f"logits               {tuple(outputs.logits.shape)} (1/{config.output_stride} of the input)")
    print(f"auxiliary_logits     {tuple(outputs.auxiliary_logits.shape)}")
    for index, scores in enumerate(outputs.region_class_scores):
        print(f"region_class_scores  [{index}] {tuple(scores.shape)}")
    print(f"loss                 {outputs.loss.item():.4f} = segmentation {outputs.segmentation_loss.item():.4f} "
          f"+ {config.auxiliary_loss_weight} x auxiliary {outputs.auxiliary_loss.item():.4f} "
          f"+ {config.region_loss_weight} x region {outputs.region_loss.item():.4f}")
    print(f"time                 forward {forward_seconds:.1f} s, backward {backward_seconds:.1f} s")
    print(f"peak memory          {peak_memory_gib():.2f} GiB (resident)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
