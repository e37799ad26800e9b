"""
The stream protocol on its own: a session, a real registry, and fakes for the
transport and the decode loop.
"""

import json

import numpy as np
from twisted.internet.testing import MemoryReactorClock
from twisted.trial import unittest

from parakeet import messages
from parakeet.engine import StepResult
from parakeet.protocol import Limits, StreamSession
from parakeet.registry import StreamRegistry

from .fakes import FakeChannel, FakeLoop
from .helpers import GEOMETRY
from .test_messages import audio_json


class SessionTests(unittest.TestCase):

    def setUp(self):
        self.clock = MemoryReactorClock()
        self.registry = StreamRegistry(2, GEOMETRY, 16000, self.clock)
        self.loop = FakeLoop()

    def session(self, **limits):
        channel = FakeChannel()
        session = StreamSession(self.registry, self.loop, Limits(**limits), channel, "tcp")
        session.connection_made()
        return session, channel

    def test_hello(self):
        session, channel = self.session()
        self.assertEqual(channel.sent, [{"type": "hello", "stream_id": 1,
                                         "sample_rate": 16000}])
        self.assertIn(session.stream, self.registry)

    def test_refused_when_full(self):
        self.session()
        self.session()
        session, channel = self.session()
        self.assertEqual(channel.sent, [messages.error(messages.NO_FREE_STATE)])
        self.assertTrue(channel.closed)
        self.assertEqual(len(self.registry), 2)
        session.message_received(b'{"type": "ping"}')  # ignored: it has no stream
        session.connection_lost()
        self.assertEqual(len(self.registry), 2)

    def test_audio_is_pushed_and_final_finishes(self):
        session, channel = self.session()
        session.message_received(audio_json(np.zeros(1000, np.float32)))
        self.assertEqual(session.stream.received, 1000)
        self.assertFalse(session.stream.finishing)
        session.message_received(audio_json(np.zeros(500, np.float32), final=True))
        self.assertEqual(session.stream.received, 1500)
        self.assertEqual(session.stream.end_reason, "final")
        self.assertEqual(self.loop.steps, 1)  # the loop is asked to decode at once

    def test_a_completed_chunk_wakes_an_idle_loop(self):
        session, channel = self.session()
        needed = GEOMETRY.samples_needed(0)
        session.message_received(audio_json(np.zeros(needed - 1, np.float32)))
        self.assertEqual(self.loop.steps, 0)
        self.loop.busy = True
        session.message_received(audio_json(np.zeros(1, np.float32)))
        self.assertEqual(self.loop.steps, 0)  # the running step's end picks it up
        self.loop.busy = False
        session.message_received(audio_json(np.zeros(1, np.float32)))
        self.assertEqual(self.loop.steps, 1)

    def test_max_stream_seconds_cuts_exactly(self):
        session, channel = self.session(max_stream_seconds=0.1)
        session.message_received(audio_json(np.zeros(1000, np.float32)))
        session.message_received(audio_json(np.zeros(1000, np.float32)))
        self.assertEqual(session.stream.received, 1600)
        self.assertEqual(session.stream.end_reason, "max-stream-seconds")
        (error,) = channel.of_type("error")
        self.assertEqual(error["message"],
                         "stream exceeded --max-stream-seconds=0.1: audio after 0.10 s "
                         "was not decoded; the stream is being finalized")

    def test_results(self):
        session, channel = self.session()
        stream = session.stream
        # A step that emitted nothing sends nothing.
        session.stream_result(stream, StepResult(stream.id, [], [], "", False))
        self.assertEqual(channel.of_type("result"), [])
        stream.text = " hello"
        stream.decoded_samples = 2656
        session.stream_result(stream, StepResult(stream.id, [5, 6], [0.5, 0.25], " hello",
                                                 False))
        stream.decoded_samples = 3000
        session.stream_result(stream, StepResult(stream.id, [], [], "", True))
        self.assertEqual(channel.of_type("result"), [
            messages.result(stream.id, "hello", [5, 6], [0.5, 0.25], False, 166.0),
            messages.result(stream.id, "hello", [], [], True, 187.5)])
        self.assertTrue(channel.closed)

    def test_nothing_is_sent_after_the_connection_is_lost(self):
        session, channel = self.session()
        session.message_received(audio_json(np.zeros(1000, np.float32)))
        session.connection_lost()
        self.assertEqual(session.stream.end_reason, "disconnected")
        session.stream_result(session.stream,
                              StepResult(session.stream.id, [1], [0.5], " a", True))
        session.stream_failed(session.stream, "decoding failed")
        self.assertEqual([m["type"] for m in channel.sent], ["hello"])

    def test_engine_failure(self):
        session, channel = self.session()
        session.stream_failed(session.stream, "decoding failed: out of memory")
        self.assertEqual(channel.sent[-1], messages.error("decoding failed: out of memory"))
        self.assertTrue(channel.closed)

    def test_message_too_large(self):
        session, channel = self.session()
        session.message_too_large(5000000)
        self.assertEqual(channel.sent[-1]["message"],
                         "message too large: the limit is 1048576 bytes (got 5000000)")
        json.dumps(channel.sent)  # everything sent is plain JSON

    def test_refused_while_shutting_down(self):
        self.registry.closed = True
        session, channel = self.session()
        self.assertEqual(channel.sent, [messages.error("The server is shutting down.")])
        self.assertTrue(channel.closed)
        self.assertEqual(len(self.registry), 0)

    def test_idle_timeout(self):
        session, channel = self.session(idle_timeout=5.0)
        self.clock.advance(4)
        session.message_received(b'{"type": "ping"}')  # any message counts
        self.clock.advance(4)
        self.assertFalse(session.stream.finishing)
        self.clock.advance(1)
        self.assertEqual(session.stream.end_reason, "idle-timeout")
        self.assertEqual(channel.sent[-1]["message"],
                         "no message for 5 s (--idle-timeout): the stream was finalized")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_no_idle_timeout(self):
        session, channel = self.session(idle_timeout=0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_backlog_pauses_reading(self):
        session, channel = self.session(max_backlog_seconds=1.0)
        session.message_received(audio_json(np.zeros(16000, np.float32)))
        self.assertEqual(channel.paused, set())
        session.message_received(audio_json(np.zeros(800, np.float32)))
        self.assertEqual(channel.paused, {"backlog"})
        stream = session.stream
        # Results of decoded chunks resume reading once half the limit is left.
        while stream.cutter.buffered_samples > 8000:
            stream.cutter.next_chunk()
            session.stream_result(stream, StepResult(stream.id, [], [], "", False))
        self.assertEqual(channel.paused, set())

    def test_write_timeout(self):
        session, channel = self.session(write_timeout=3.0)
        session.write_blocked()
        self.clock.advance(2)
        session.write_unblocked()
        self.clock.advance(2)
        self.assertFalse(channel.aborted)
        session.write_blocked()
        self.clock.advance(3)
        self.assertTrue(channel.aborted)
        self.flushLoggedErrors()

    def test_timers_end_with_the_connection(self):
        session, channel = self.session(idle_timeout=5.0, write_timeout=3.0)
        session.write_blocked()
        session.connection_lost()
        self.assertEqual(self.clock.getDelayedCalls(), [])
