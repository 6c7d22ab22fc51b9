"""CPUSyncBatchNorm2d on two gloo processes equals BatchNorm2d on the whole batch: outputs, gradients, statistics."""

import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as multiprocessing
from torch import nn

from pcaa_hf.training.sync_batch_norm import CPUSyncBatchNorm2d, convert_sync_batch_norm


def whole_batch_reference(inputs, weight, bias):
    norm = nn.BatchNorm2d(3)
    norm.weight.data.copy_(weight)
    norm.bias.data.copy_(bias)
    inputs = inputs.clone().requires_grad_()
    output = norm(inputs)
    (output * torch.arange(output.numel()).view_as(output).sin()).sum().backward()
    return output.detach(), inputs.grad, norm.weight.grad, norm.bias.grad, norm.running_mean, norm.running_var


def synced_half(rank, port, inputs, weight, bias, results):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    norm = convert_sync_batch_norm(nn.Sequential(nn.BatchNorm2d(3)), torch.device("cpu"))[0]
    norm.weight.data.copy_(weight)
    norm.bias.data.copy_(bias)
    half = inputs[rank * 3:(rank + 1) * 3].clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast hands BatchNorm bf16 inputs; statistics stay fp32
        norm(half.bfloat16())
    norm.running_mean.zero_(), norm.running_var.fill_(1), norm.num_batches_tracked.zero_()
    output = norm(half)
    weights = torch.arange(inputs[:6].numel()).view_as(inputs[:6]).sin()[rank * 3:(rank + 1) * 3]
    (output * weights).sum().backward()
    # Parameter gradients are per process (DDP sums them); the input gradients and statistics are global.
    results[rank] = (output.detach(), half.grad, norm.weight.grad, norm.bias.grad, norm.running_mean,
                     norm.running_var)
    dist.destroy_process_group()


def test_cpu_sync_batch_norm_matches_batch_norm_over_the_global_batch():
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(6, 3, 5, 7, generator=generator) * 3 + 1
    weight, bias = torch.rand(3, generator=generator) + 0.5, torch.randn(3, generator=generator)
    expected = whole_batch_reference(inputs, weight, bias)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    manager = multiprocessing.Manager()
    results = manager.dict()
    multiprocessing.spawn(synced_half, args=(port, inputs, weight, bias, results), nprocs=2)
    first, second = results[0], results[1]
    torch.testing.assert_close(torch.cat([first[0], second[0]]), expected[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat([first[1], second[1]]), expected[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(first[2] + second[2], expected[2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(first[3] + second[3], expected[3], rtol=1e-5, atol=1e-5)
    for rank_result in (first, second):
        torch.testing.assert_close(rank_result[4], expected[4], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(rank_result[5], expected[5], rtol=1e-5, atol=1e-6)


def test_conversion_keeps_weights_and_is_plain_batch_norm_on_one_process():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Sequential(nn.BatchNorm2d(4)))
    model[1][0].running_mean.fill_(0.5)
    converted = convert_sync_batch_norm(model, torch.device("cpu"))
    assert type(converted[1][0]) is CPUSyncBatchNorm2d
    assert torch.equal(converted[1][0].running_mean, torch.full((4,), 0.5))
    reference = nn.BatchNorm2d(4)
    reference.load_state_dict(converted[1][0].state_dict())
    inputs = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(converted[1][0](inputs), reference(inputs))
