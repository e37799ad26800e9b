import numpy as np
from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock
from twisted.trial import unittest

from parakeet.server.decodeloop import DecodeLoop
from parakeet.server.registry import StreamRegistry

from .support.fakes import FakeEngine, RecordingListener
from .support.models import GEOMETRY

CHUNK = 2560


def inline(function, *args):
    return defer.maybeDeferred(function, *args)


class DecodeLoopTests(unittest.TestCase):

    def setUp(self):
        self.clock = MemoryReactorClock()
        self.registry = StreamRegistry(8, GEOMETRY, 16000, self.clock)
        self.engine = FakeEngine(GEOMETRY)
        self.listener = RecordingListener()

    def loop(self, run_step=inline, max_batch=None):
        loop = DecodeLoop(self.engine, self.registry, self.clock, interval=0.01,
                          max_batch=max_batch, run_step=run_step)
        loop.startService()
        self.addCleanup(loop.stopService)
        return loop

    def open(self, n, seconds=0.0):
        streams = [self.registry.open("peer", "tcp", self.listener) for _ in range(n)]
        for s in streams:
            s.push(np.zeros(int(seconds * 16000), np.float32))
        return streams

    def test_batches_every_ready_stream(self):
        self.loop()
        self.open(3, seconds=0.1)
        self.clock.advance(0.01)
        self.assertEqual(self.engine.batches, [[1, 2, 3]])
        self.assertEqual([r.token_ids for _, r in self.listener.results], [[9]] * 3)

    def test_idle_ticks_do_nothing(self):
        self.loop()
        self.open(2)
        for _ in range(10):
            self.clock.advance(0.01)
        self.assertEqual(self.engine.batches, [])

    def test_max_batch_takes_turns(self):
        self.loop(max_batch=2)
        self.open(5, seconds=2.0)
        for _ in range(5):
            self.clock.advance(0.01)
        served = [sid for batch in self.engine.batches for sid in batch]
        self.assertTrue(all(len(b) == 2 for b in self.engine.batches))
        # Nobody is served twice before everybody has been served once.
        self.assertEqual(sorted(served[:5]), [1, 2, 3, 4, 5])

    def test_one_step_at_a_time(self):
        pending = []

        def slow(function, *args):
            d = defer.Deferred()
            pending.append((d, function, args))
            return d

        loop = self.loop(run_step=slow)
        self.open(2, seconds=0.5)
        self.clock.advance(0.01)
        self.clock.advance(0.01)
        self.assertEqual(len(pending), 1)
        self.assertTrue(loop.busy)
        d, function, args = pending.pop()
        d.callback(function(*args))
        self.assertFalse(loop.busy)
        # The next step starts straight away, not at the next tick.
        self.clock.advance(0)
        self.assertEqual(len(pending), 1)
        d, function, args = pending.pop()
        d.callback(function(*args))

    def test_wakes_in_one_turn_make_one_step_on_the_next(self):
        loop = self.loop()
        a, b = self.open(2)
        for stream in (a, b):
            stream.push(np.zeros(1600, np.float32))
            loop.wake()
        self.assertEqual(self.engine.batches, [])
        self.clock.advance(0)
        self.assertEqual(self.engine.batches, [[1, 2]])

    def test_last_chunk_releases_the_stream(self):
        self.loop()
        (stream,) = self.open(1, seconds=0.3)
        stream.finish("final")
        for _ in range(4):
            self.clock.advance(0.01)
        self.assertEqual(len(self.registry), 0)
        results = [r for _, r in self.listener.results]
        self.assertEqual([r.is_last for r in results], [False] * (len(results) - 1) + [True])
        self.assertEqual(sum(t for r in results for t in r.token_ids), GEOMETRY.frames_for(4800))

    def test_failed_step_ends_its_streams_only(self):
        calls = []

        def flaky(function, *args):
            calls.append(args)
            if len(calls) == 1:
                return defer.fail(RuntimeError("CUDA out of memory"))
            return inline(function, *args)

        self.loop(run_step=flaky)
        first = self.open(2, seconds=0.1)
        self.clock.advance(0.01)
        self.assertEqual(sorted(sid for sid, _ in self.listener.failures), [1, 2])
        self.assertIn("CUDA out of memory", self.listener.failures[0][1])
        self.assertEqual([s in self.registry for s in first], [False, False])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        # The loop carries on with new streams.
        self.open(1, seconds=0.1)
        self.clock.advance(0.01)
        self.assertEqual(self.engine.batches, [[3]])

    def test_tick_survives_a_bug(self):
        loop = self.loop()
        self.open(1, seconds=0.1)
        broken = self.registry.in_turn
        self.registry.in_turn = lambda: 1 / 0
        self.clock.advance(0.01)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.registry.in_turn = broken
        self.clock.advance(0.01)
        self.assertEqual(self.engine.batches, [[1]])
        self.assertTrue(loop._loop.running)

    def test_stop_waits_for_the_step_in_flight(self):
        pending = []

        def slow(function, *args):
            d = defer.Deferred()
            pending.append((d, function, args))
            return d

        loop = DecodeLoop(self.engine, self.registry, self.clock, run_step=slow)
        loop.startService()
        self.open(1, seconds=0.1)
        self.clock.advance(loop.interval)
        stopped = loop.stopService()
        self.assertNoResult(stopped)
        d, function, args = pending.pop()
        d.callback(function(*args))
        self.successResultOf(stopped)
