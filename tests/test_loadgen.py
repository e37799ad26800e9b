"""
The bench's load (:mod:`parakeet.clients.loadgen`) and its statistics
(:mod:`parakeet.clients.latency`) without a server: percentiles, latency
matching, the find-max search, the encoded messages, and how a stream
reports a connection that ends early.
"""

import base64
import json

import numpy as np
from twisted.internet import defer, task
from twisted.internet.error import ConnectionRefusedError
from twisted.trial import unittest

from parakeet.clients import latency, loadgen
from parakeet.clients.connection import HandshakeFailed

from .support.models import speechlike


class PercentileTests(unittest.TestCase):

    def test_matches_numpy(self):
        values = [5.0, 1.0, 9.0, 3.0, 7.0, 2.0, 8.0]
        for q in (0, 10, 50, 95, 99, 100):
            self.assertAlmostEqual(latency.percentile(values, q), np.percentile(values, q))

    def test_edges(self):
        self.assertIsNone(latency.percentile([], 50))
        self.assertEqual(latency.percentile([4.0], 99), 4.0)
        self.assertEqual(latency.percentile([1.0, 2.0], 50), 1.5)


class LatencyMatchingTests(unittest.TestCase):
    # Three 100 ms messages sent at 10.0, 10.1 and 10.25 (the last one late).
    cumulative = [100.0, 200.0, 300.0]
    sent = [10.0, 10.1, 10.25]

    def latencies(self, *results, sent=None):
        return latency.result_latencies(results, self.cumulative,
                                        self.sent if sent is None else sent)

    def test_first_message_reaching_audio_ms(self):
        found = self.latencies((10.05, 40.0), (10.3, 150.0), (10.4, 300.0))
        for got, want in zip(found, [0.05, 0.2, 0.15]):
            self.assertAlmostEqual(got, want)

    def test_boundaries(self):
        # Exactly a message's cumulative audio is that message, not the next;
        # a rounded audio_ms a hair above it too.
        found = self.latencies((10.2, 200.0), (10.2, 200.0004), (10.2, 0.0))
        for got, want in zip(found, [0.1, 0.1, 0.2]):
            self.assertAlmostEqual(got, want)
        self.assertAlmostEqual(self.latencies((10.5, 200.7))[0], 0.25)

    def test_unmatched(self):
        # More audio than was sent so far, or no audio_ms at all: no latency.
        self.assertEqual(self.latencies((10.2, 250.0), sent=[10.0, 10.1]), [None])
        self.assertEqual(self.latencies((10.5, 400.0), (10.5, None),
                                        (10.5, float("nan"))), [None, None, None])


class FindMaxTests(unittest.TestCase):

    def search(self, threshold, start, limit, deferred=False):
        probed = []

        def probe(n):
            probed.append(n)
            passed = n <= threshold
            return defer.succeed(passed) if deferred else passed

        best, tried = self.successResultOf(loadgen.find_max(probe, start, limit))
        self.assertEqual([n for n, _ in tried], probed)
        self.assertEqual([p for _, p in tried], [n <= threshold for n in probed])
        return best, probed

    def test_doubles_then_bisects(self):
        self.assertEqual(self.search(13, 1, 1024),
                         (13, [1, 2, 4, 8, 16, 12, 14, 13]))

    def test_first_probe_fails(self):
        self.assertEqual(self.search(5, 32, 1024), (5, [32, 16, 8, 4, 6, 5]))

    def test_nothing_passes(self):
        self.assertEqual(self.search(0, 4, 1024), (0, [4, 2, 1]))

    def test_limit(self):
        self.assertEqual(self.search(100, 3, 20), (20, [3, 6, 12, 20]))
        self.assertEqual(self.search(100, 50, 20), (20, [20]))

    def test_asynchronous_probe(self):
        self.assertEqual(self.search(6, 2, 64, deferred=True), (6, [2, 4, 8, 6, 7]))

    def test_every_answer(self):
        for threshold in range(0, 40):
            for start in (1, 3, 8):
                best, probed = self.search(threshold, start, 33)
                self.assertEqual(best, min(threshold, 33))
                self.assertEqual(len(probed), len(set(probed)))


class PayloadTests(unittest.TestCase):

    def test_json_messages(self):
        audio = speechlike(1, 0.25)  # shorter than the stream: it is looped
        plan = loadgen.Payloads(audio, 16000, 1.05, 100, "ws")
        self.assertEqual(len(plan.steps), 11)
        self.assertAlmostEqual(plan.interval, 0.1)
        self.assertEqual(plan.cumulative_ms[:2], [100.0, 200.0])
        self.assertEqual(plan.cumulative_ms[-1], 1050.0)
        messages = [json.loads(frames[0][0]) for frames in plan.steps]
        self.assertEqual([m["final"] for m in messages], [False] * 10 + [True])
        self.assertTrue(all(len(frames) == 1 and not frames[0][1] for frames in plan.steps))
        pcm = b"".join(base64.b64decode(m["data"]) for m in messages)
        self.assertEqual(len(pcm), 2 * 16800)
        looped = np.frombuffer(pcm, "<i2")
        self.assertTrue(np.array_equal(looped[:4000], looped[4000:8000]))

    def test_tcp_lines(self):
        plan = loadgen.Payloads(speechlike(2, 1.0), 8000, 0.5, 100, "tcp")
        self.assertEqual(len(plan.steps), 5)
        for frames in plan.steps:
            self.assertTrue(frames[0][0].endswith(b"}\n"))
            self.assertEqual(frames[0][0].count(b"\n"), 1)

    def test_binary_messages(self):
        plan = loadgen.Payloads(speechlike(3, 1.0), 16000, 0.35, 100, "ws-binary")
        self.assertEqual([len(f[0][0]) for f in plan.steps], [3200, 3200, 3200, 1600])
        self.assertTrue(all(f[0][1] for f in plan.steps))
        self.assertEqual(len(plan.steps[-1]), 2)
        final, binary = plan.steps[-1][1]
        self.assertFalse(binary)
        self.assertEqual(json.loads(final), {"type": "audio", "data": "",
                                             "encoding": "pcm16", "final": True})


class _Run:
    """What a BenchStream asks of its run, with a clock the test drives."""

    final_timeout = 30.0

    def __init__(self, connector):
        self.reactor = task.Clock()
        self.clock = self.reactor.seconds
        self.connector = connector
        self.workload = None


class BenchStreamTests(unittest.TestCase):
    """How a stream reports a connection that ends early."""

    def stream(self, connector):
        stream = loadgen.BenchStream(_Run(connector), 0, 0.0)
        stream.connect()
        return stream

    def test_cannot_connect(self):
        stream = self.stream(lambda client: defer.fail(ConnectionRefusedError()))
        self.assertEqual(stream.errors, ["cannot connect: Connection was refused by "
                                         "other side."])
        self.assertIs(self.successResultOf(stream.done), stream)

    def test_handshake_failed(self):
        stream = self.stream(lambda client: defer.fail(HandshakeFailed(1006, None)))
        self.assertEqual(stream.errors, ["WebSocket handshake failed: 1006 "])
        stream = self.stream(lambda client: defer.fail(HandshakeFailed(403, "Forbidden")))
        self.assertEqual(stream.errors, ["WebSocket handshake failed: 403 Forbidden"])

    def test_closed_before_hello(self):
        stream = self.stream(lambda client: defer.succeed(client))
        self.assertNoResult(stream.done)
        stream.client._received(b"[1, 2]")
        stream.client._received(b"not json")
        stream.client._lost()
        self.assertIs(self.successResultOf(stream.done), stream)
        self.assertEqual(stream.errors, [
            "unreadable message from the server: b'[1, 2]'",
            "unreadable message from the server: b'not json'"])
        stream = self.stream(lambda client: defer.succeed(client))
        stream.client._lost()
        self.assertEqual(stream.errors, ["the connection closed before hello"])

    def test_messages_are_not_kept(self):
        stream = self.stream(lambda client: defer.succeed(client))
        stream.client._received(b'{"type": "result", "audio_ms": 160, "is_final": false}')
        self.assertEqual(stream.results, [(0.0, 160.0, False)])
        self.assertEqual(stream.client.messages, [])
