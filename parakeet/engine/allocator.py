"""
How the server process keeps its memory: one malloc arena, a garbage
collector that leaves the loaded model alone, and a kernel cache that holds
every shape the model runs.

glibc gives threads that allocate concurrently arenas of their own, built of
heaps that it shrinks, handing pages back to the kernel, whenever their top
is free.  The model thread allocates and frees tens of megabytes of
temporaries in every step (the batch's encoder caches, the layers'
activations), so in its own arena each step faulted its pages back in one by
one: about 12 000 page faults a step at 20 streams of the small model, an
eighth of the step.  In the main arena, which is trimmed only past
``M_TRIM_THRESHOLD``, the same pages stay mapped from step to step.  A server
has a handful of threads, so one arena costs nothing in lock contention.
"""

import ctypes
import gc
import os

#: glibc's mallopt parameter for the most arenas (malloc.h).
M_ARENA_MAX = -8

#: oneDNN kernels kept for reuse; its own default is 1024.
KERNEL_CACHE_CAPACITY = 16384

#: The environment variables oneDNN reads its kernel cache's capacity from.
KERNEL_CACHE_VARIABLES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "DNNL_PRIMITIVE_CACHE_CAPACITY")


def use_one_arena():
    """Make every thread allocate from the main arena, unless
    ``MALLOC_ARENA_MAX`` in the environment says otherwise.  It takes effect
    only if called before a second thread allocates.  True if set (glibc);
    False elsewhere, where it does nothing."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return mallopt(M_ARENA_MAX, 1) == 1


def freeze_loaded_objects():
    """Collect what loading left behind, then exempt every object alive now
    from later garbage collections.  With the small model loaded the
    process holds some 780 000 objects the collector tracks (modules,
    parameters, configuration), and a full collection walks them all
    holding the GIL: 320-330 ms in which neither the reactor nor the model
    thread runs.  Python starts one whenever the objects that outlived
    younger collections reach a quarter of those already old, which a
    server with many streams coming and going reaches in time.  Frozen, the
    model is never walked again; what the server allocates from here on is
    collected as before."""
    gc.collect()
    gc.freeze()


def keep_cpu_kernels(capacity=KERNEL_CACHE_CAPACITY):
    """Let oneDNN, which runs torch's convolutions and (in bfloat16) matrix
    products on the CPU, keep up to capacity compiled kernels instead of its
    default 1024, unless the environment sets that capacity (any of
    :data:`KERNEL_CACHE_VARIABLES`).  A kernel is compiled for one shape, and a
    step's shapes follow its batch size: the small model needs some 60 per
    batch size, so a server whose batches range over 1 to 40 streams needs
    more than 2 000, and with 1024 it evicted and compiled them again all
    the time (1 700 compilations, 0.6 s, in 20 s of 26 streams).  oneDNN
    reads the setting when it first runs, so this must be called before
    torch computes anything on the CPU.  True if set."""
    if any(name in os.environ for name in KERNEL_CACHE_VARIABLES):
        return False
    os.environ[KERNEL_CACHE_VARIABLES[0]] = str(capacity)
    return True
