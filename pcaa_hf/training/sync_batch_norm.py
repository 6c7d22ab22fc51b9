"""BatchNorm synchronised across processes, as the paper trains (SyncBatchNorm), on GPUs and on CPUs.

torch's `nn.SyncBatchNorm` runs only on GPUs; `convert_sync_batch_norm` uses it there and, on CPU processes (gloo),
`CPUSyncBatchNorm2d`, which computes the same statistics with differentiable all-reduces.
"""

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_functional
from torch import nn


class CPUSyncBatchNorm2d(nn.BatchNorm2d):
    """
    BatchNorm2d whose training statistics are the mean and variance over the whole global batch (every process):
    per-channel sums are all-reduced (mean first, then the centred squares, for stability); gradients flow through
    the all-reduces. In eval mode, or on a single process, it is plain BatchNorm2d.
    """

    def forward(self, input):
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(input)
        # Statistics in float32 whatever autocast gives (bf16 sums would lose precision; the buffers are float32).
        data = input.float()
        channels = data.shape[1]
        count = torch.tensor([data.numel() // channels], dtype=torch.float32, device=data.device)
        total = dist_functional.all_reduce(count)
        mean = dist_functional.all_reduce(data.sum(dim=(0, 2, 3))) / total
        centred = data - mean[None, :, None, None]
        variance = dist_functional.all_reduce(centred.square().sum(dim=(0, 2, 3))) / total
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = 1.0 / self.num_batches_tracked.item() if self.momentum is None else self.momentum
                unbiased = variance * (total / (total - 1).clamp(min=1))
                self.running_mean.lerp_(mean.detach(), momentum)
                self.running_var.lerp_(unbiased.detach(), momentum)
        normalised = centred * torch.rsqrt(variance + self.eps)[None, :, None, None]
        if self.affine:
            normalised = normalised * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return normalised.to(input.dtype)


def convert_sync_batch_norm(model, device):
    """Every BatchNorm2d of `model` synchronised across processes: torch's SyncBatchNorm on GPUs, ours on CPUs."""
    if device.type != "cpu":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, module in model.named_children():
        if type(module) is nn.BatchNorm2d:
            synced = CPUSyncBatchNorm2d(module.num_features, module.eps, module.momentum, module.affine,
                                        module.track_running_stats)
            synced.load_state_dict(module.state_dict())
            synced.train(module.training)
            setattr(model, name, synced)
        else:
            convert_sync_batch_norm(module, device)
    return model


__all__ = ["CPUSyncBatchNorm2d", "convert_sync_batch_norm"]
