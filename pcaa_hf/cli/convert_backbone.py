"""Convert an open-mmlab ResNet-V1c ImageNet checkpoint (resnet18_v1c, resnet50_v1c, resnet101_v1c; the weights the
paper starts from) into a safetensors file of PCAA backbone weights, checked strictly: every backbone weight must be
in the file, only the ImageNet classifier (fc.*) is left out, mismatches are listed by name.

Example:
    python scripts/convert_openmmlab_backbone.py --checkpoint resnet50_v1c-2cccc1ad.pth --depth 50 \
        --output resnet50_v1c.safetensors
    python scripts/train.py ... --backbone_depth 50 --pretrained_backbone resnet50_v1c.safetensors
"""

import sys

from pcaa_hf.cli.arguments import ArgumentParser, output_file, reports_errors
from pcaa_hf.conversion.openmmlab_backbones import save_backbone_safetensors
from pcaa_hf.model.backbone_pcaa import PCAAResNetBackbone
from pcaa_hf.model.configuration_pcaa import BACKBONE_DEPTHS, PCAAConfig


@reports_errors
def main(argv=None):
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", required=True, help="open-mmlab's .pth file (a `state_dict` nesting is fine)")
    parser.add_argument("--depth", required=True, type=int, choices=BACKBONE_DEPTHS, help="the ResNet's depth")
    parser.add_argument("--output", required=True, type=output_file,
                        help="the .safetensors file to write (its folder is created if needed)")
    args = parser.parse_args(argv)
    if args.output.suffix != ".safetensors":
        parser.error(f"--output must end with .safetensors, got {args.output}")
    backbone = PCAAResNetBackbone(PCAAConfig(backbone_depth=args.depth))
    output = save_backbone_safetensors(args.checkpoint, backbone, args.output)
    print(f"Wrote {output}: {len(backbone.state_dict())} ResNet-{args.depth} V1c backbone tensors (fc.* left out).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
