"""How the C library hands memory to large CPU tensors: reused, rather than mapped afresh for each one."""

import ctypes
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
    peaked at. Process-wide, so the scripts call it, not the library. Returns False, changing nothing, where the C
    library is not glibc (an allocator preloaded in its place, such as jemalloc, ignores the settings).
    """
    if platform.system() != "Linux":
        return False
    libc = ctypes.CDLL(None)  # the running process's own C library
    if not hasattr(libc, "gnu_get_libc_version"):
        return False
    no_mapped_blocks = libc.mallopt(M_MMAP_MAX, 0)
    no_trimming = libc.mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1)
    return bool(no_mapped_blocks and no_trimming)


__all__ = ["reuse_freed_cpu_memory"]
