"""
Dilated ResNet "v1c" (deep stem, stride on the 3x3 conv) as used by PCAA, at output stride 8 or 16, and its CPU
inference fast path (the last section: the one place where execution differs from the modules' plain forward).
"""

from contextlib import contextmanager, nullcontext

import torch
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
    originals = [dict(norm.named_buffers(recurse=False)) for norm in norms]
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


class PCAAConvNormAct(nn.Module):
    """Conv (no bias, padding = dilation * (kernel // 2)) -> BatchNorm -> optional ReLU."""

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

    def forward(self, hidden_state):
        return self.activation(self.norm(self.conv(hidden_state)))


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

    def forward(self, hidden_state):
        # In place: the branch ends in a BatchNorm, whose output nothing saves for backward.
        return self.activation(self.branch(hidden_state).add_(self.shortcut(hidden_state)))


class PCAABasicBlock(PCAAResidualBlock):
    """3x3 (stride, dilation) -> 3x3 (ResNet-18/34; the second conv is undilated, as in mmsegmentation)."""

    expansion = 1

    def __init__(self, in_channels, width, stride=1, dilation=1):
        super().__init__(in_channels, width * self.expansion, stride)
        self.conv1 = PCAAConvNormAct(in_channels, width, 3, stride=stride, dilation=dilation)
        self.conv2 = PCAAConvNormAct(width, width * self.expansion, 3, activation=False)

    def branch(self, hidden_state):
        return self.conv2(self.conv1(hidden_state))


class PCAABottleneck(PCAAResidualBlock):
    """1x1 -> 3x3 (stride, dilation) -> 1x1 to 4x the width (ResNet-50/101)."""

    expansion = 4

    def __init__(self, in_channels, width, stride=1, dilation=1):
        super().__init__(in_channels, width * self.expansion, stride)
        self.conv1 = PCAAConvNormAct(in_channels, width, 1)
        self.conv2 = PCAAConvNormAct(width, width, 3, stride=stride, dilation=dilation)
        self.conv3 = PCAAConvNormAct(width, width * self.expansion, 1, activation=False)

    def branch(self, hidden_state):
        return self.conv3(self.conv2(self.conv1(hidden_state)))


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
            self.stages.append(nn.Sequential(*blocks))
        self.channels = [STEM_WIDTHS[-1]] + [width * block.expansion for width in STAGE_WIDTHS]

    def forward(self, pixel_values):
        hidden_state = self.stem(pixel_values)
        hidden_states = (hidden_state,)
        for stage in self.stages:
            hidden_state = stage(hidden_state)
            hidden_states += (hidden_state,)
        return hidden_states


# CPU inference fast path. Measured A/B in one process on the CPUs it runs on (docs/benchmarks.md): running the
# backbone's activations channels-last, the layout oneDNN convolves without reordering every layer's input and
# output, takes up to 12 % off a CPU forward in float32 and 7 - 9 % in bfloat16, while the decode head's wide 3x3
# convolutions run faster in the standard layout. (Phase decompositions of the dilated stages and BatchNorm folded
# into the convolutions gained under the run-to-run noise on AMD Zen 4 and were dropped.)

_cpu_fast_paths_enabled = True


def set_cpu_fast_paths(enabled: bool) -> None:
    """Switch the CPU inference fast path on (the default) or off for every PCAA model in this process."""
    global _cpu_fast_paths_enabled
    _cpu_fast_paths_enabled = bool(enabled)


@contextmanager
def cpu_fast_paths(enabled: bool):
    """`with cpu_fast_paths(False): model(pixel_values)` runs the plain forward; the previous setting returns after."""
    previous = _cpu_fast_paths_enabled
    set_cpu_fast_paths(enabled)
    try:
        yield
    finally:
        set_cpu_fast_paths(previous)


def is_exporting() -> bool:
    """Whether torch.export is tracing: `torch.compiler.is_exporting()`, False on torch versions without it."""
    return getattr(torch.compiler, "is_exporting", bool)()


def is_traced() -> bool:
    """Whether the call is being traced into a graph (torch.jit.trace, torch.compile, torch.export), not run eagerly."""
    return torch.jit.is_tracing() or torch.compiler.is_compiling() or is_exporting()


def uses_cpu_fast_paths(module: nn.Module, pixel_values: torch.Tensor) -> bool:
    """
    The one predicate of the fast path: `module` (the model) runs its forward on `pixel_values` on the fast path when
    the path is switched on (`set_cpu_fast_paths`, `cpu_fast_paths`), the module is in eval mode, the input is on the
    CPU, and nothing traces, compiles or exports the call (a graph keeps the plain forward, which serves every size
    and batch).
    """
    return _cpu_fast_paths_enabled and not module.training and pixel_values.device.type == "cpu" and not is_traced()


def standard_layout(hidden_state: torch.Tensor) -> torch.Tensor:
    """
    (B, C, H, W) in any memory layout -> the same values, contiguous. A channels-last map is copied image by image as
    the transpose of its (H * W, C) matrix, which torch copies in cache-sized blocks: 3x faster on CPUs than its
    general permuting copy (27 against 87 ms for a 2048x96x96 map).
    """
    if hidden_state.is_contiguous() or not hidden_state.is_contiguous(memory_format=torch.channels_last):
        return hidden_state.contiguous()
    channels = hidden_state.shape[1]
    standard = torch.empty_like(hidden_state, memory_format=torch.contiguous_format)
    for image in range(hidden_state.shape[0]):
        standard[image].view(channels, -1).copy_(hidden_state[image].permute(1, 2, 0).reshape(-1, channels).t())
    return standard


def backbone_on_cpu_fast_path(backbone: PCAAResNetBackbone, pixel_values: torch.Tensor, kept_maps: int):
    """
    The last `kept_maps` outputs of `backbone(pixel_values)`, computed with channels-last activations and returned in
    the standard layout; each channels-last map is freed as its copy replaces it.
    """
    feature_maps = list(backbone(pixel_values.contiguous(memory_format=torch.channels_last))[-kept_maps:])
    for index in range(len(feature_maps)):
        feature_maps[index] = standard_layout(feature_maps[index])
    return tuple(feature_maps)


__all__ = ["PCAAConvNormAct", "PCAAResNetBackbone", "PCAAResidualBlock", "cpu_fast_paths", "set_cpu_fast_paths"]
