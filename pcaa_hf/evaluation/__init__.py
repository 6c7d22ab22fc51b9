"""Scoring segmentations: mean IoU as `evaluate` computes it (and its offline `evaluate` module), and the evaluation
of a model over a data set split across processes."""
