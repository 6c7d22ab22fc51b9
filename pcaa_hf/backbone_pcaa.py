"""Dilated ResNet "v1c" (deep stem, stride on the 3x3 conv) as used by PCAA, at output stride 8 or 16."""

import math
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

BOTTLENECK_DEPTHS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
BASIC_DEPTHS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}
STAGE_WIDTHS = (64, 128, 256, 512)
STEM_WIDTHS = (32, 32, 64)
MULTI_GRID = (1, 2, 4)


def is_batch_norm(module: nn.Module) -> bool:
    # SyncBatchNorm is not a subclass of BatchNorm2d, so match on the name as transformers' ResNet does.
    return "BatchNorm" in type(module).__name__


@contextmanager
def preserved_running_statistics(module: nn.Module):
    """Let BatchNorm layers update throwaway copies of their running statistics (for checkpoint recomputation)."""
    norms = [m for m in module.modules() if is_batch_norm(m) and getattr(m, "track_running_stats", False)]
    originals = [{name: buffer for name, buffer in norm.named_buffers(recurse=False)} for norm in norms]
    for norm, buffers in zip(norms, originals):
        for name, buffer in buffers.items():
            setattr(norm, name, buffer.clone())
    try:
        yield
    finally:
        for norm, buffers in zip(norms, originals):
            for name, buffer in buffers.items():
                setattr(norm, name, buffer)


def checkpoint_preserving_statistics(checkpoint, module: nn.Module, function, *args, **kwargs):
    """
    `checkpoint(function, *args, **kwargs)` whose recomputation of `function` in the backward pass (its second call)
    leaves `module`'s BatchNorm running statistics as the first call left them. Counting calls rather than passing a
    `context_fn` works with `use_reentrant=True` too, which accepts none.
    """
    calls = 0

    def run(*run_args, **run_kwargs):
        nonlocal calls
        calls += 1
        with preserved_running_statistics(module) if calls > 1 else nullcontext():
            return function(*run_args, **run_kwargs)

    return checkpoint(run, *args, **kwargs)


def is_exporting() -> bool:
    """Whether torch.export is tracing: `torch.compiler.is_exporting()`, False on torch versions without it."""
    return getattr(torch.compiler, "is_exporting", bool)()


def memory_layout(tensor: torch.Tensor) -> torch.memory_format:
    channels_last = not tensor.is_contiguous() and tensor.is_contiguous(memory_format=torch.channels_last)
    return torch.channels_last if channels_last else torch.contiguous_format


def standard_layout(hidden_state: torch.Tensor) -> torch.Tensor:
    """
    (B, C, H, W) in any memory layout -> the same values, contiguous. A channels-last map is copied image by image as
    the transpose of its (H * W, C) matrix, which torch copies in cache-sized blocks: 3x faster on CPUs than its
    general permuting copy (27 against 87 ms for a 2048x96x96 map). Traced or compiled, one copy of the whole batch:
    a loop over the batch would fix its size in the trace.
    """
    tracing = torch.jit.is_tracing() or torch.compiler.is_compiling()
    if tracing or memory_layout(hidden_state) is not torch.channels_last:
        return hidden_state.contiguous()
    channels = hidden_state.shape[1]
    standard = torch.empty_like(hidden_state, memory_format=torch.contiguous_format)
    for image in range(hidden_state.shape[0]):
        standard[image].view(channels, -1).copy_(hidden_state[image].permute(1, 2, 0).reshape(-1, channels).t())
    return standard


def to_phases(hidden_state: torch.Tensor, phases: int) -> torch.Tensor:
    """
    Space-to-batch: (B, C, H, W) -> (phases * phases * B, C, H / phases, W / phases), where batch entry
    (i * phases + j) * B + b holds `hidden_state[b, :, i::phases, j::phases]`; H and W must be divisible by `phases`.
    One copy, into the input's memory layout.
    """
    if phases == 1:
        return hidden_state
    batch, channels, height, width = hidden_state.shape
    shape = (phases * phases * batch, channels, height // phases, width // phases)
    phased = torch.empty(shape, dtype=hidden_state.dtype, device=hidden_state.device,
                         memory_format=memory_layout(hidden_state))
    grid = hidden_state.unflatten(3, (width // phases, phases)).unflatten(2, (height // phases, phases))
    phased.unflatten(0, (phases, phases, batch)).copy_(grid.permute(3, 5, 0, 1, 2, 4))
    return phased


def from_phases(phased: torch.Tensor, phases: int) -> torch.Tensor:
    """Batch-to-space, the inverse of `to_phases`: (phases * phases * B, C, h, w) -> (B, C, h * phases, w * phases)."""
    if phases == 1:
        return phased
    batch, channels, height, width = phased.shape[0] // (phases * phases), *phased.shape[1:]
    shape = (batch, channels, height * phases, width * phases)
    hidden_state = torch.empty(shape, dtype=phased.dtype, device=phased.device, memory_format=memory_layout(phased))
    grid = hidden_state.unflatten(3, (width, phases)).unflatten(2, (height, phases))
    grid.copy_(phased.unflatten(0, (phases, phases, batch)).permute(2, 3, 4, 0, 5, 1))
    return hidden_state


class PCAAConvNormAct(nn.Sequential):
    """Conv (no bias, padding = dilation * (kernel // 2)) -> BatchNorm -> optional ReLU; one conv in inference."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, dilation=1, activation=True):
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=dilation * (kernel_size // 2),
            dilation=dilation,
            bias=False,
        )
        self.norm = nn.BatchNorm2d(out_channels)
        self.activation = nn.ReLU(inplace=True) if activation else nn.Identity()

    @property
    def is_plain(self):
        """
        Whether its conv and norm are torch's layers, neither wrapped nor hooked (as by LoRA, fake quantisation or an
        offloading hook): only then may `forward` run the conv as a function, with another dilation or BatchNorm
        folded in, without skipping what a wrapper or hook does.
        """
        layers = (self.conv, self.norm)
        hooked = any(layer._forward_hooks or layer._forward_pre_hooks or layer._backward_hooks
                     or layer._backward_pre_hooks for layer in layers)
        return type(self.conv) is nn.Conv2d and is_batch_norm(self.norm) and not hooked

    def forward(self, hidden_state, phases=1):
        """
        `phases` > 1: `hidden_state` is `to_phases(x, phases)` of a map x. A conv dilated by d on x is then the same
        conv dilated by d / phases on each phase (plain layers only, see `is_plain`). In inference, BatchNorm runs
        inside the conv.
        """
        if not self.is_plain:
            return self.activation(self.norm(self.conv(hidden_state)))
        conv, norm = self.conv, self.norm
        weight, bias = conv.weight, conv.bias
        folded = not norm.training and norm.running_mean is not None and norm.affine
        if folded:
            # Normalising with running statistics is a per-channel affine map: folded into the conv's weights and bias
            # (anew at every call, so it always reflects the current parameters), it spares a pass over the output.
            # In float32 at least (a bfloat16 model is rounded once, at the end).
            dtype = torch.promote_types(weight.dtype, torch.float32)
            scale = norm.weight.to(dtype) * torch.rsqrt(norm.running_var.to(dtype) + norm.eps)
            shift = norm.bias.to(dtype) - norm.running_mean.to(dtype) * scale
            bias = (shift if bias is None else torch.addcmul(shift, bias.to(dtype), scale)).to(weight.dtype)
            weight = (weight.to(dtype) * scale.view(-1, 1, 1, 1)).to(weight.dtype)
            if hidden_state.device.type == "cpu" and hidden_state.is_contiguous():
                # oneDNN convolves in the channels-last layout whenever the weight is in it: a standard-layout input
                # (the decode head's in CPU inference, faster so) keeps its layout only with a standard-layout weight.
                weight = weight.contiguous()
        dilation = tuple(rate // phases for rate in conv.dilation)
        padding = tuple(rate * (size // 2) for rate, size in zip(dilation, conv.kernel_size))
        hidden_state = F.conv2d(hidden_state, weight, bias, conv.stride, padding, dilation, conv.groups)
        return self.activation(hidden_state if folded else norm(hidden_state))


class PCAAResidualBlock(GradientCheckpointingLayer):
    """
    relu(branch(x) + shortcut(x)); the shortcut is a 1x1 conv + BatchNorm when the block changes stride or width.
    The unit of activation checkpointing.
    """

    def __init__(self, in_channels, out_channels, stride):
        super().__init__()
        self.shortcut = (
            PCAAConvNormAct(in_channels, out_channels, 1, stride=stride, activation=False)
            if stride != 1 or in_channels != out_channels
            else nn.Identity()
        )
        self.activation = nn.ReLU(inplace=True)

    def forward(self, hidden_state, phases=1):
        # In place: the branch ends in a BatchNorm or (in inference) a conv, whose output nothing saves for backward.
        return self.activation(self.branch(hidden_state, phases).add_(self.shortcut(hidden_state)))


class PCAABasicBlock(PCAAResidualBlock):
    """3x3 (stride, dilation) -> 3x3 (ResNet-18/34; the second conv is undilated, as in mmsegmentation)."""

    expansion = 1

    def __init__(self, in_channels, width, stride=1, dilation=1):
        super().__init__(in_channels, width * self.expansion, stride)
        self.conv1 = PCAAConvNormAct(in_channels, width, 3, stride=stride, dilation=dilation)
        self.conv2 = PCAAConvNormAct(width, width * self.expansion, 3, activation=False)

    def branch(self, hidden_state, phases):
        return self.conv2(self.conv1(hidden_state, phases), phases)


class PCAABottleneck(PCAAResidualBlock):
    """1x1 -> 3x3 (stride, dilation) -> 1x1 to 4x the width (ResNet-50/101)."""

    expansion = 4

    def __init__(self, in_channels, width, stride=1, dilation=1):
        super().__init__(in_channels, width * self.expansion, stride)
        self.conv1 = PCAAConvNormAct(in_channels, width, 1)
        self.conv2 = PCAAConvNormAct(width, width, 3, stride=stride, dilation=dilation)
        self.conv3 = PCAAConvNormAct(width, width * self.expansion, 1, activation=False)

    def branch(self, hidden_state, phases):
        return self.conv3(self.conv2(self.conv1(hidden_state), phases))


class PCAAResNetStage(nn.Sequential):
    """
    The residual blocks of one stage. On CPUs a dilated stage runs on the phase decomposition of its input
    (`to_phases`), by the largest factor dividing every dilation of its convs and the map's height and width: there
    its convs are dilated less (R50/R101 at output stride 8: stage 3 not at all), the same computation, which oneDNN
    runs up to a third faster where its dilated kernels are slow (docs/benchmarks.md; not measured on GPUs yet, which
    keep the dilated convs). Input and output (B, C, H, W).
    """

    def __init__(self, *blocks):
        super().__init__(*blocks)
        convs = [module for module in self.modules() if isinstance(module, nn.Conv2d)]
        dilations = [rate for conv in convs if conv.kernel_size != (1, 1) for rate in conv.dilation]
        strided = any(conv.stride != (1, 1) for conv in convs)
        self.phases = 1 if strided else math.gcd(*dilations)

    def forward(self, hidden_state):
        sizes, phases = hidden_state.shape[2:], 1
        # Exported or traced with symbolic sizes, the dilated convs run as they are (the same computation): a phase
        # count would guard on the sizes' divisibility, fixing it for every size the graph serves.
        symbolic = is_exporting() or any(isinstance(size, torch.SymInt) for size in sizes)
        if hidden_state.device.type == "cpu" and not symbolic:
            # gcd(self.phases, H, W) written with `%`: torch.compile traces math.gcd as a graph break, even on ints.
            phases = next(p for p in range(self.phases, 0, -1)
                          if self.phases % p == 0 and all(size % p == 0 for size in sizes))
        if phases > 1 and not all(layer.is_plain for layer in self.modules() if isinstance(layer, PCAAConvNormAct)):
            phases = 1
        hidden_state = to_phases(hidden_state, phases)
        for block in self:
            hidden_state = block(hidden_state, phases)
        return from_phases(hidden_state, phases)


def stage_strides_and_dilations(output_stride: int):
    """(stride, dilation) of stages 1-4: stride 8 dilates stages 3 and 4 by 2 and 4, stride 16 dilates stage 4 by 2."""
    if output_stride == 8:
        return ((1, 1), (2, 1), (1, 2), (1, 4))
    return ((1, 1), (2, 1), (2, 1), (1, 2))


class PCAAResNetBackbone(nn.Module):
    """
    Dilated ResNet "v1c": a deep stem (three 3x3 convs, 3->32->32->64, the first with stride 2) and a 3x3 max-pool
    (stride 2), then four residual stages. Every block of a dilated stage uses the stage's dilation, the first block
    included; with multi-grid, the blocks of stage 4 multiply it by 1, 2, 4 in turn.

    Input: `pixel_values` (B, C, H, W). Output: a tuple of the stem output (B, 64, H/4, W/4) and the four stage
    outputs with `channels[1:]` channels (4x the stage widths 64/128/256/512 for bottleneck blocks, 1x for basic
    blocks) at strides 4, 8, 8, 8 (output stride 8) or 4, 8, 16, 16 (output stride 16); sizes round up.
    """

    def __init__(self, config):
        super().__init__()
        bottleneck = config.backbone_depth in BOTTLENECK_DEPTHS
        block = PCAABottleneck if bottleneck else PCAABasicBlock
        depths = BOTTLENECK_DEPTHS[config.backbone_depth] if bottleneck else BASIC_DEPTHS[config.backbone_depth]

        self.stem = nn.Sequential(
            PCAAConvNormAct(config.num_channels, STEM_WIDTHS[0], 3, stride=2),
            PCAAConvNormAct(STEM_WIDTHS[0], STEM_WIDTHS[1], 3),
            PCAAConvNormAct(STEM_WIDTHS[1], STEM_WIDTHS[2], 3),
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
        )
        in_channels = STEM_WIDTHS[-1]
        self.stages = nn.ModuleList()
        stage_settings = stage_strides_and_dilations(config.output_stride)
        for index, (depth, width, (stride, dilation)) in enumerate(zip(depths, STAGE_WIDTHS, stage_settings)):
            is_last = index == len(depths) - 1
            blocks = []
            for block_index in range(depth):
                grid = MULTI_GRID[block_index % len(MULTI_GRID)] if config.multi_grid and is_last else 1
                blocks.append(block(in_channels, width, stride if block_index == 0 else 1, dilation * grid))
                in_channels = width * block.expansion
            self.stages.append(PCAAResNetStage(*blocks))
        self.channels = [STEM_WIDTHS[-1]] + [width * block.expansion for width in STAGE_WIDTHS]

    def forward(self, pixel_values):
        hidden_state = self.stem(pixel_values)
        hidden_states = (hidden_state,)
        for stage in self.stages:
            hidden_state = stage(hidden_state)
            hidden_states += (hidden_state,)
        return hidden_states


__all__ = ["PCAAResNetBackbone", "PCAAConvNormAct", "PCAAResidualBlock"]
