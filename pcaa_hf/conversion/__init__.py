"""Weights from elsewhere: the authors' PCAA checkpoints and open-mmlab's ImageNet backbones; the comparison of a
converted model with the authors' code (parity)."""
