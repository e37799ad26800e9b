"""
The server process seen through ``/proc`` (:mod:`parakeet.clients.serverstats`):
CPU time and memory, and waiting until it is idle.
"""

import os

from twisted.internet import task
from twisted.trial import unittest

from parakeet.clients import serverstats


class ProcTests(unittest.TestCase):

    def test_own_process(self):
        self.assertGreater(serverstats.process_cpu_seconds(os.getpid()), 0)
        self.assertGreater(serverstats.process_rss_bytes(os.getpid()), 1 << 20)

    def test_waits_until_the_server_is_idle(self):
        clock = task.Clock()
        # A core busy for 1.2 s, then idle.
        cpu = lambda: min(clock.seconds(), 1.2)
        d = serverstats.wait_until_idle(clock, cpu, busy=0.2, window=0.5)
        clock.advance(0.5)
        clock.advance(0.5)
        self.assertNoResult(d)
        clock.advance(0.5)  # 0.2 s of CPU in this window: still busy
        self.assertNoResult(d)
        clock.advance(0.5)
        self.assertEqual(self.successResultOf(d), 2.0)

    def test_gives_up_waiting_after_the_limit(self):
        clock = task.Clock()
        d = serverstats.wait_until_idle(clock, clock.seconds, window=0.5, limit=3.0)
        clock.pump([0.5] * 5)
        self.assertNoResult(d)
        clock.advance(0.5)
        self.assertEqual(self.successResultOf(d), 3.0)
