"""Freed CPU tensor memory is reused: another large tensor costs no page faults (checked in fresh processes, since
the setting is process-wide)."""

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

PROGRAM = """
import resource, sys
import torch
from pcaa_hf.cpu_memory import reuse_freed_cpu_memory
reused = reuse_freed_cpu_memory() if sys.argv[1] == "reuse" else False
faults = []
for _ in range(6):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(64 * 2 ** 18)  # 64 MB, freed at once
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(reused, min(faults[2:]))  # once the heap has settled; the fewest, as other work may fault pages too
"""


def page_faults_of_a_later_tensor(mode):
    environment = {**os.environ, "THP_MEM_ALLOC_ENABLE": "0"}  # 4 KB pages: 16,384 of them in 64 MB
    result = subprocess.run([sys.executable, "-c", PROGRAM, mode], capture_output=True, text=True, timeout=120,
                            env=environment)
    assert result.returncode == 0, result.stderr
    reused, faults = result.stdout.split()
    return reused == "True", int(faults)


def system_huge_pages():
    """The kernel's transparent huge page mode: "always" backs large blocks with 2 MB pages whatever torch asks."""
    try:
        return Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return "unknown"


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
@pytest.mark.skipif(system_huge_pages() == "always", reason="counts 4 KB page faults; the kernel maps 2 MB pages")
def test_a_freed_large_tensor_leaves_its_memory_for_the_next():
    assert page_faults_of_a_later_tensor("default") == (False, pytest.approx(16384, rel=0.1))
    reused, faults = page_faults_of_a_later_tensor("reuse")
    assert reused and faults < 200
