"""Running a trained model on images: the paper's inference modes (whole image, sliding windows, multi-scale and
flip), the image-segmentation pipeline, and pictures of predictions and class activations."""
