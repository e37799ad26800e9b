"""
The server's threads share one malloc arena, the garbage collector leaves the
loaded model alone, and oneDNN keeps a kernel for every shape
(``parakeet.engine.allocator``).
"""

import os
import platform
import subprocess
import sys

from twisted.trial import unittest

from parakeet.engine.allocator import KERNEL_CACHE_VARIABLES, keep_cpu_kernels, use_one_arena

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: Starts four threads that allocate at once, then prints how many arenas
#: glibc's malloc_info reports; with "one", asks for one arena first.
COUNT_ARENAS = r"""
import ctypes, sys, tempfile, threading
from parakeet.engine.allocator import use_one_arena
if sys.argv[1] == "one":
    assert use_one_arena()
together = threading.Barrier(4)
held = []
def allocate():
    held.append(bytearray(1 << 16))
    together.wait()
    held.append(bytearray(1 << 16))
threads = [threading.Thread(target=allocate) for _ in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join()
libc = ctypes.CDLL(None)
libc.fopen.restype = ctypes.c_void_p
with tempfile.NamedTemporaryFile(suffix=".xml") as out:
    stream = ctypes.c_void_p(libc.fopen(out.name.encode(), b"w"))
    libc.malloc_info(0, stream)
    libc.fclose(stream)
    print(open(out.name).read().count("<heap nr="))
"""


def arenas(*argv):
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    env["PYTHONPATH"] = ROOT
    out = subprocess.run([sys.executable, "-c", COUNT_ARENAS] + list(argv), env=env,
                         check=True, capture_output=True, text=True, timeout=60).stdout
    return int(out.split()[-1])


class OneArenaTests(unittest.TestCase):

    def setUp(self):
        if platform.libc_ver()[0] != "glibc":
            raise unittest.SkipTest("malloc arenas are glibc's")

    def test_threads_share_the_main_arena(self):
        self.assertGreater(arenas("default"), 1)
        self.assertEqual(arenas("one"), 1)

    def test_environment_decides_when_it_says(self):
        self.patch(os, "environ", dict(os.environ, MALLOC_ARENA_MAX="4"))
        self.assertFalse(use_one_arena())


#: Builds objects standing for a loaded model and a garbage cycle, freezes,
#: and prints what the collector still sees.
FREEZE = r"""
import gc, weakref
from parakeet.engine.allocator import freeze_loaded_objects
class Node:
    pass
model = [{"layer": i, "weights": [i]} for i in range(50000)]
cycle = Node(); cycle.self = cycle
gone = weakref.ref(cycle)
del cycle
tracked = len(gc.get_objects())
freeze_loaded_objects()
later = [[i] for i in range(1000)]
print(tracked, gc.get_freeze_count(), len(gc.get_objects()), gone() is None)
"""


class FreezeTests(unittest.TestCase):

    def test_loaded_objects_are_left_out_of_collections(self):
        out = subprocess.run([sys.executable, "-c", FREEZE],
                             env=dict(os.environ, PYTHONPATH=ROOT), check=True,
                             capture_output=True, text=True, timeout=60).stdout
        tracked, frozen, seen, collected = out.split()
        # The "model" (100 000 tracked objects) is frozen and no longer
        # walked; what is allocated afterwards is; the cycle was collected
        # first, not frozen.
        self.assertGreater(int(tracked), 100000)
        self.assertGreater(int(frozen), 100000)
        self.assertLess(int(seen), 5000)
        self.assertGreaterEqual(int(seen), 1000)
        self.assertEqual(collected, "True")


#: Runs a convolution at 40 batch sizes, twice over, marking the end of each
#: round, with oneDNN reporting every kernel it compiles; with "keep", asks
#: for a kernel cache of 16 first.
KERNELS = r"""
import sys
from parakeet.engine.allocator import keep_cpu_kernels
if sys.argv[1] == "keep":
    keep_cpu_kernels(16)
import torch
conv = torch.nn.Conv1d(8, 8, 3)
with torch.inference_mode():
    for _ in range(2):
        for n in range(1, 41):
            conv(torch.zeros(n, 8, 32))
        print("round", flush=True)
"""


def compiled_per_round(mode, **environ):
    env = {k: v for k, v in os.environ.items() if k not in KERNEL_CACHE_VARIABLES}
    env.update(environ, PYTHONPATH=ROOT, ONEDNN_VERBOSE="profile_create")
    out = subprocess.run([sys.executable, "-c", KERNELS, mode], env=env, check=True,
                         capture_output=True, text=True, timeout=120).stdout
    rounds = out.split("round")[:2]
    return [r.count("create:cache_miss") for r in rounds]


class KernelCacheTests(unittest.TestCase):

    def setUp(self):
        import torch
        if not torch.backends.mkldnn.is_available():
            raise unittest.SkipTest("torch is built without oneDNN")

    def test_cache_capacity_is_set_before_torch_computes(self):
        # 40 batch sizes, two kernels each (the convolution and a reorder).
        # oneDNN's own cache (1024) keeps them all, so the second round
        # compiles nothing; the cache of 16 asked for evicts each kernel
        # before its turn comes again, so the setting took effect.
        first, second = compiled_per_round("default")
        self.assertGreaterEqual(first, 40)
        self.assertEqual(second, 0)
        first, second = compiled_per_round("keep")
        self.assertGreaterEqual(second, 40)
        # The environment's capacity wins.
        first, second = compiled_per_round("keep", ONEDNN_PRIMITIVE_CACHE_CAPACITY="256")
        self.assertEqual(second, 0)

    def test_environment_decides_when_it_says(self):
        self.patch(os, "environ", dict(os.environ, ONEDNN_PRIMITIVE_CACHE_CAPACITY="4096"))
        self.assertFalse(keep_cpu_kernels())
        self.assertEqual(os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"], "4096")
