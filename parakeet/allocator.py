"""
One malloc arena for the whole server process.

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
import os

#: glibc's mallopt parameter for the most arenas (malloc.h).
M_ARENA_MAX = -8


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
