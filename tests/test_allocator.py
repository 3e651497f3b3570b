"""keep_freed_memory: big blocks freed and asked for again cost no new page faults,
and the heap they come from stops growing."""

import platform
import subprocess
import sys

import pytest

PROBE = """
import resource, sys
import torch
from dsgd_mpi.allocator import keep_freed_memory
kept = sys.argv[1] == "kept" and keep_freed_memory()
usage = lambda: resource.getrusage(resource.RUSAGE_SELF)
# 64 MB, touched: past any mmap threshold. glibc's aligned allocations leave a freed
# block a few bytes short of the next request at first, so the heap grows for a few
# rounds before its free blocks fit.
for _ in range(12):
    x = torch.ones(16 * 2**20)
    del x
before = usage()
for _ in range(8):  # what training steps do: ask again for the sizes just freed
    x = torch.ones(16 * 2**20)
    del x
after = usage()
print(int(kept), after.ru_minflt - before.ru_minflt, after.ru_maxrss - before.ru_maxrss)
"""
PAGES = 64 * 2**20 // 4096


def _after_warm_up(how: str) -> tuple[bool, int, int]:
    """(kept, page faults, max-RSS growth in KiB) of 8 rounds after 12."""
    out = subprocess.run([sys.executable, "-c", PROBE, how], capture_output=True, text=True,
                         timeout=120, check=True).stdout.split()  # fmt: skip
    return out[0] == "1", int(out[1]), int(out[2])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_freed_blocks_come_back_without_page_faults_or_growth() -> None:
    took, faults, growth = _after_warm_up("kept")
    _, default, _ = _after_warm_up("default")
    assert took
    assert default > 6 * PAGES  # glibc's default: munmap on free, fault again on reuse
    assert faults < PAGES
    assert growth < 64 * 1024  # KiB: not one more block
