"""
Process-wide memory settings for large CPU tensors, applied by the command-line tools (never by the library), and the
check of a run's mixed precision against its device and the end of its processes, shared by training and evaluation.
"""

import ctypes
import os
import platform

# mallopt parameters of glibc's malloc.h
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4


def reuse_freed_cpu_memory() -> bool:
    """
    Make glibc's malloc keep the memory of freed large CPU tensors for the next ones. By default it maps every block
    over 32 MB afresh and unmaps it when freed, and returns the free top of its heap to the kernel: each new
    activation then costs a page fault and the zeroing of every page (30,000 - 70,000 faults and 5 % of the time of
    an R101 forward at 768x768 on a 2-core CPU, docs/benchmarks.md). The price: the process keeps the memory it
    peaked at. Returns False, changing nothing, where the C library is not glibc (an allocator preloaded in its
    place, such as jemalloc, ignores the settings).
    """
    if platform.system() != "Linux":
        return False
    libc = ctypes.CDLL(None)  # the running process's own C library
    if not hasattr(libc, "gnu_get_libc_version"):
        return False
    no_mapped_blocks = libc.mallopt(M_MMAP_MAX, 0)
    no_trimming = libc.mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1)
    return bool(no_mapped_blocks and no_trimming)


def configure_cpu_process() -> bool:
    """
    The memory settings every command-line tool applies first, before it creates a tensor:
    - large CPU tensors on transparent huge pages (`THP_MEM_ALLOC_ENABLE=1`, unless set already), 7x fewer page
      faults and about 4 % faster inference (docs/benchmarks.md). torch reads the variable at its first CPU
      allocation, not at import, so setting it here works as long as no tensor exists yet;
    - freed CPU memory kept for reuse (`reuse_freed_cpu_memory`, whose result is returned).
    In your own scripts, call this the same way, first.
    """
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    return reuse_freed_cpu_memory()


def check_mixed_precision(accelerator):
    """
    Refuse fp16 autocast on a CPU: accelerate accepts it there but runs in float32, so a run or evaluation asked for
    fp16 would silently measure something else. bf16 is the CPU's half precision.
    """
    if accelerator.device.type == "cpu" and accelerator.mixed_precision == "fp16":
        raise ValueError("mixed_precision fp16 does nothing on CPUs (it would silently run in float32): use bf16 "
                         "or no.")


def end_processes(accelerator):
    """
    Wait for every process, then end the run's trackers and process group. A gloo worker thread frees each finished
    collective's tensors, which needs the GIL; a process group torn down before it could (at `end_training`, or at
    exit) joins that thread while holding the GIL, and the process hangs or aborts. Waiting in the barrier releases
    the GIL while the other processes catch up, which gives the worker its chance: it narrows the race, torch's to
    close.
    """
    accelerator.wait_for_everyone()
    accelerator.end_training()


__all__ = ["check_mixed_precision", "configure_cpu_process", "end_processes", "reuse_freed_cpu_memory"]
