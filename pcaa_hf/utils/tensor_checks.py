"""Checks of weights before they are converted, saved or exported."""

import torch


def non_finite_tensors(state_dict):
    """The names, sorted, of the floating-point tensors of `state_dict` that hold a NaN or an infinity."""
    return sorted(name for name, tensor in state_dict.items()
                  if tensor.is_floating_point() and not torch.isfinite(tensor).all())
