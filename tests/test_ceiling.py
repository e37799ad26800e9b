"""
The in-process ceiling (:mod:`parakeet.measuring.ceiling`): the paced run's
accounting, on the tiny replica with a clock the test drives.
"""

import io
import sys

import numpy as np
from twisted.trial import unittest

from parakeet.contract import ChunkCutter
from parakeet.measuring import ceiling

from .support.models import assert_engine_idle, shared_tiny_engine, tiny_model_path


class SteppedClock:
    """Time that passes only in sleep() and in the engine's steps."""

    def __init__(self, engine, step_seconds):
        self.now = 0.0
        self.sleeps = 0
        self.batches = []
        self._step = engine.step
        self.step_seconds = step_seconds

    def clock(self):
        return self.now

    def sleep(self, seconds):
        self.sleeps += 1
        self.now += seconds

    def step(self, chunks):
        self.batches.append(len(chunks))
        self.now += self.step_seconds
        return self._step(chunks)


class PacedTests(unittest.TestCase):

    def setUp(self):
        self.engine = shared_tiny_engine()

    def tearDown(self):
        assert_engine_idle(self, self.engine)

    def paced(self, n, step_seconds, seconds=1.2, stagger=0.0):
        clock = SteppedClock(self.engine, step_seconds)
        self.patch(self.engine, "step", clock.step)
        latencies, finals = ceiling.measure_paced(
            self.engine, n, seconds, 1000, stagger=stagger, clock=clock.clock,
            sleep=clock.sleep)
        return latencies, finals, clock

    def test_an_idle_engine_answers_in_one_step(self):
        # 160 ms chunks, 100 ms pieces, 50 ms steps: no chunk waits for another's step.
        latencies, finals, clock = self.paced(1, 0.05)
        # 1.2 s: a first chunk, six more, and the last one, which is final.
        self.assertEqual((len(latencies), len(finals)), (7, 1))
        for latency in latencies + finals:
            self.assertAlmostEqual(latency, 0.05)
        self.assertEqual(set(clock.batches), {1})
        self.assertGreater(clock.sleeps, 0)

    def test_streams_ready_together_share_a_step(self):
        latencies, finals, clock = self.paced(3, 0.05)
        self.assertEqual(set(clock.batches), {3})
        self.assertEqual((len(latencies), len(finals)), (21, 3))
        for latency in latencies + finals:
            self.assertAlmostEqual(latency, 0.05)

    def test_a_chunk_waits_for_the_step_in_flight(self):
        # Starts 100 ms apart with 150 ms steps: the second stream's chunks
        # are completed while the first's step runs.
        latencies, finals, clock = self.paced(2, 0.15, stagger=0.2)
        self.assertGreater(max(latencies), 0.15 + 1e-6)
        self.assertLessEqual(max(latencies), 0.3 + 1e-6)
        self.assertIn(2, clock.batches)

    def test_streams_decode_the_audio_given(self):
        audio = np.arange(4000, dtype=np.float32) / 4000
        pushed = []
        self.patch(ChunkCutter, "push", lambda cutter, samples: pushed.append(samples))
        self.patch(ChunkCutter, "finish", lambda cutter: None)
        # Cutters that never fill: measure reads each stream's audio, decodes nothing.
        self.assertEqual(ceiling.measure(self.engine, 2, 0.6, 1, audio), [])
        self.assertEqual([len(p) for p in pushed], [9600, 9600])
        for samples in pushed:
            np.testing.assert_array_equal(samples, np.resize(audio, 9600))
        # Without it, each stream its own calibration audio.
        del pushed[:]
        ceiling.measure(self.engine, 2, 0.6, 1)
        self.assertFalse(np.array_equal(pushed[0], pushed[1]))

    def test_summary(self):
        summary = ceiling.paced_summary([0.1, 0.2, 0.3], [0.25], bound=0.32, keep_up=1.0)
        self.assertEqual((summary["latency_p50_ms"], summary["latency_max_ms"],
                          summary["ttf_p50_ms"], summary["passes"]), (200.0, 300.0, 250.0, True))
        self.assertFalse(ceiling.paced_summary([0.1, 0.2, 0.3], [1.5])["passes"])
        self.assertFalse(ceiling.paced_summary([0.4] * 20, [0.1])["passes"])
        self.assertFalse(ceiling.paced_summary([], [0.1])["passes"])


class CommandTests(unittest.TestCase):

    def test_paced_lines(self):
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        ceiling.main(["--model", tiny_model_path(), "--streams", "2", "--seconds", "1",
                      "--paced", "--precision", "float32"])
        text = out.getvalue()
        self.assertIn("in float32", text)
        self.assertRegex(text, r"\n +2 +[0-9.]+ +[0-9.]+ ")
        self.assertRegex(text, r"paced: latency p50 [0-9.]+ ms, p95 [0-9.]+ ms, max [0-9.]+ ms; "
                               r"time to final p50 [0-9.]+ ms: (passes|fails)")
