"""torch's CPU parallelism belongs to the engine thread; every other thread runs its torch ops alone.

torch runs a large CPU op on a team of threads that belongs to the thread calling it (OpenMP's, and
for a matrix product MKL's). A second long-lived thread with a team of its own beside the engine's
slowed every later forward of the engine, for the life of the process. Measured on 2 cores,
gpt2-small-random, a 16-token forward at 990 cached: 50-56 ms, then 66-76 ms after one 256-token
KV copy on another thread that stays alive (the KV tiers' writer is one). P1's cached TTFT
through a worker with its default KV tiers was 108-114 ms, against 66-72 ms with the tiers off.
(libgomp's idle threads spin between ops only while it manages no more threads than there are
CPUs; past that they sleep and wake around every op. OMP_WAIT_POLICY=passive, which always
sleeps, gave the same slow forwards with no second team.)

`confine_to_one_thread` caps the calling thread's own ops at one thread, which creates no team;
nothing else changes (torch's global thread count, the engine thread's own). The worker calls it
at the start of every thread it owns that may run a torch op: the default executor's threads
(asyncio.to_thread) and the KV tiers' writer. Copies then run at memory speed on that thread.
"""

import ctypes
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch


def _c_function(library: str | None, name: str):
    """A C function of a library the process has loaded (None: its global symbols), or None."""
    try:
        return getattr(ctypes.CDLL(library), name)
    except (OSError, AttributeError):
        return None


# OpenMP's per-thread count (libgomp, exported by torch's wheel); MKL's per-thread count (linked
# into libtorch_cpu; MKL_Set_Num_Threads_Local is its C entry, mkl_set_num_threads_local the
# Fortran one, which takes a pointer). Either may be absent in another build; then that part is
# not capped.
_omp_set_num_threads = _c_function(None, "omp_set_num_threads")
_mkl_set_num_threads_local = _c_function(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"),
                                         "MKL_Set_Num_Threads_Local")


def confine_to_one_thread() -> None:
    """This thread's torch ops from now on run on it alone. Call it before its first op."""
    # torch sets a thread's OpenMP and MKL counts (to its global count) the first time the thread
    # asks for them: do that first, so it does not undo the cap later.
    torch.get_num_threads()
    if _omp_set_num_threads is not None:
        _omp_set_num_threads(1)
    if _mkl_set_num_threads_local is not None:
        _mkl_set_num_threads_local(1)


def confined_executor() -> ThreadPoolExecutor:
    """A thread pool whose threads are confined (the worker's default executor)."""
    return ThreadPoolExecutor(thread_name_prefix="worker-io", initializer=confine_to_one_thread)
