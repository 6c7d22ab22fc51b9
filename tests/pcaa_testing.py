"""Helpers shared by the tests."""

import socket

import torch

from pcaa_hf import PCAAConfig


def small_config(**overrides):
    """A ResNet-18-depth PCAA with a narrow head: fast on 2 CPU cores."""
    settings = dict(backbone_depth=18, hidden_size=64, auxiliary_hidden_size=32, num_labels=5)
    settings.update(overrides)
    return PCAAConfig(**settings)


@torch.no_grad()
def randomise_weights(model, seed=0):
    """Deterministic weights independent of the init code, with BatchNorm statistics that keep activations O(1)."""
    generator = torch.Generator().manual_seed(seed)
    for name, tensor in sorted(model.state_dict().items()):
        if name.endswith("num_batches_tracked"):
            continue
        if name.endswith("running_var"):
            tensor.copy_(torch.rand(tensor.shape, generator=generator) * 0.5 + 0.75)
        elif name.endswith("running_mean") or name.endswith("bias"):
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.1)
        elif tensor.ndim == 1:
            tensor.copy_(torch.rand(tensor.shape, generator=generator) * 0.5 + 0.5)
        else:
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * (1.0 / tensor[0].numel()) ** 0.5)
    return model


def two_cpu_processes_launcher():
    """
    `python -m ...` arguments launching a script on 2 CPU processes with gloo; run it with ACCELERATE_USE_CPU=1.
    `accelerate launch --cpu` starts one process unless MPI is installed, hence torchrun's launcher (--multi_gpu).
    """
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return ("-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port))
