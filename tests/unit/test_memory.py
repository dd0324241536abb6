"""fix_mmap_threshold: a large array, freed, leaves the process's RSS (glibc's default keeps the
second one in the heap). Each case runs in a fresh interpreter: the threshold is process-wide."""

import subprocess
import sys

import pytest

PROBE = """
import sys
import numpy as np
from services.common.memory import fix_mmap_threshold

def rss_mib():
    line = next(l for l in open("/proc/self/status") if l.startswith("VmRSS"))
    return int(line.split()[1]) / 1024

if sys.argv[1] == "fixed":
    assert fix_mmap_threshold()
base = rss_mib()
for _ in range(3):  # as the ring's merges do: a 24 MB array made, filled and freed, again
    a = np.ones(6_000_000, np.uint32)
    del a
print(rss_mib() - base)
"""


def resident_after_free(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return float(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_arrays_leave_rss_once_the_threshold_is_fixed():
    assert resident_after_free("default") > 20  # the heap kept the second array: why this exists
    assert resident_after_free("fixed") < 4


def test_startup_objects_are_frozen_out_of_full_collections():
    import gc

    from services.common.memory import freeze_startup_objects
    kept = [{"n": i} for i in range(1000)]  # alive at "startup"
    try:
        frozen = freeze_startup_objects()
        assert frozen >= len(kept) and gc.get_freeze_count() == frozen
        assert all(not gc.is_tracked(k) or k not in gc.get_objects(2) for k in kept[:3])
    finally:
        gc.unfreeze()  # the test process's collector as it was
