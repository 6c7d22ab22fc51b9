"""The command-line tools' process settings: freed CPU tensor memory is reused (another large tensor costs no page
faults) and large tensors sit on huge pages, checked in fresh processes since both are process-wide."""

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

PROGRAM = """
import resource, sys
import torch
from pcaa_hf.utils.process_settings import reuse_freed_cpu_memory
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


HUGE_PAGES_PROGRAM = """
import pcaa_hf.cli.train  # every import a command-line tool makes before its first tensor
from pcaa_hf.utils.process_settings import configure_cpu_process
configure_cpu_process()
import torch
tensor = torch.ones(64 * 2 ** 20)  # 256 MB
print(next(int(line.split()[1]) for line in open("/proc/self/smaps_rollup") if line.startswith("AnonHugePages")))
"""


@pytest.mark.skipif(system_huge_pages() != "madvise", reason="torch asks for huge pages by madvise")
def test_command_line_tools_put_large_tensors_on_huge_pages_after_their_imports():
    environment = {key: value for key, value in os.environ.items() if key != "THP_MEM_ALLOC_ENABLE"}
    result = subprocess.run([sys.executable, "-c", HUGE_PAGES_PROGRAM], capture_output=True, text=True, timeout=120,
                            env=environment)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout.split()[-1]) >= 128 * 1024  # kB: at least half of the tensor on 2 MB pages
