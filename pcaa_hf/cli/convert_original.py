r"""Convert a checkpoint of the authors' PCAA code (GitHub lsa1997/PCAA) into a transformers `save_pretrained` folder.

Example:
    python scripts/convert_original_pcaa.py --checkpoint CS_scenes_60000.pth --output pcaa-r50-cityscapes \
        --backbone resnet50 --num_labels 19 --bins 4x4 --dataset cityscapes
(--num-labels and --multi-grid, the first spellings, are accepted too.) The baselines the authors' train.py trains
(--model basenet, deeplabv3, nlnet, ocrnet) convert the same way with the same --model.
"""

import logging
import sys

from pcaa_hf.cli.arguments import ArgumentParser, output_folder, positive_int, region_grid, reports_errors
from pcaa_hf.conversion.original_checkpoints import ORIGINAL_BACKBONES, ORIGINAL_MODELS, convert_original_checkpoint
from pcaa_hf.data.label_sets import LABEL_SETS


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", required=True, help="the authors' .pth state dict (a `module.` prefix is fine)")
    parser.add_argument("--output", required=True, type=output_folder,
                        help="folder to write (config, model.safetensors, image processor and code files)")
    parser.add_argument("--model", default="caanet", choices=list(ORIGINAL_MODELS),
                        help="the authors' --model the checkpoint was trained with: caanet (PCAA, the default) or a "
                             "baseline of the paper's Table 3")
    parser.add_argument("--backbone", required=True, choices=sorted(ORIGINAL_BACKBONES))
    parser.add_argument("--num_labels", required=True, type=positive_int,
                        help="number of classes (19 Cityscapes, 150 ADE20K)")
    parser.add_argument("--bins", nargs="+", type=region_grid, default=[(4, 4)], metavar="RxC",
                        help="region grid of each PCAA module, as the authors' --bin_h/--bin_w (default: 4x4; "
                             "caanet only)")
    parser.add_argument("--multi_grid", action="store_true", help="the model was trained with --multi-grid")
    parser.add_argument("--dropout", action="store_true", help="the model was trained with --dropout")
    parser.add_argument("--dataset", choices=sorted(LABEL_SETS),
                        help="also set the data set's class names and its image processor settings")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing, non-empty --output folder")
    return parser.parse_args(argv)


@reports_errors
def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    model = convert_original_checkpoint(
        args.checkpoint, args.output, args.backbone, args.num_labels, args.bins, multi_grid=args.multi_grid,
        dropout=args.dropout, dataset=args.dataset, overwrite=args.overwrite, original_model=args.model,
    )
    parameters = sum(p.numel() for p in model.parameters())
    head = f"PCAA, bins {args.bins}" if args.model == "caanet" else f"{model.config.decode_head_type} head"
    print(f"Wrote {args.output}: {args.model} ({head}) {args.backbone}, {model.config.num_labels} classes, "
          f"{parameters / 1e6:.2f}M parameters; reloaded with no missing or unexpected keys.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
