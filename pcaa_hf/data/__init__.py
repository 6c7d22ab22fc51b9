"""Data sets in the real layouts (Cityscapes, ADE20K, any image/label data set), their label sets, the paper's
augmentation, and generated stand-ins."""
