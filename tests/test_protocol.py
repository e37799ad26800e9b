"""
The stream protocol on its own: a session, a real registry, and fakes for the
transport and the decode loop.
"""

import json

import numpy as np
from twisted.internet.testing import MemoryReactorClock
from twisted.trial import unittest

from parakeet.contract import StepResult
from parakeet.server import messages
from parakeet.server.protocol import Limits, StreamSession
from parakeet.server.registry import StreamRegistry

from .support.fakes import FakeChannel, FakeLoop
from .support.models import GEOMETRY
from .support.servers import audio_json


class SessionCase(unittest.TestCase):
    """A registry of two streams, a fake loop, and sessions over fake channels."""

    def setUp(self):
        self.clock = MemoryReactorClock()
        self.registry = StreamRegistry(2, GEOMETRY, 16000, self.clock)
        self.loop = FakeLoop()

    def session(self, **limits):
        channel = FakeChannel()
        session = StreamSession(self.registry, self.loop, Limits(**limits), channel, "tcp")
        session.connection_made()
        return session, channel


class SessionTests(SessionCase):

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
        stream.decoded_samples = 2656
        session.stream_result(stream, StepResult(stream.id, [5, 6], [0.5, 0.25], " hello",
                                                 False, frames=[1, 2],
                                                 pieces=["\u2581hel", "lo"]))
        stream.decoded_samples = 3000
        session.stream_result(stream, StepResult(stream.id, [], [], "", True))
        utterance = {"index": 0, "text": "hello", "start_ms": 80, "end_ms": 240,
                     "reason": "final", "words": [
                         {"word": "hello", "start_ms": 80, "end_ms": 240,
                          "confidence": 0.375}]}
        self.assertEqual(channel.of_type("result"), [
            messages.result(stream.id, "hello", [5, 6], [0.5, 0.25], False, 166.0,
                            {"turn_detection": "start_of_utterance", "last_state": None}),
            messages.result(stream.id, "hello", [], [], True, 187.5,
                            {"turn_detection": "end_of_utterance", "last_state": None,
                             "utterance": utterance})])
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


class TurnSessionTests(SessionCase):
    """flush, config and declared sample rates, finalizing on silence."""

    def decoded(self, session, tokens=(), speech=(), is_last=False):
        """The loop delivering a step that reached the end of the stream's
        audio so far (or of its padding)."""
        stream = session.stream
        if stream.cutter.next_chunk() is not None:
            stream.decoded_samples = stream.cutter.received
        pieces = ["\u2581w%d" % t for t in tokens]
        text = "".join(" w%d" % t for t in tokens)
        session.stream_result(stream, StepResult(
            stream.id, list(tokens), [0.5] * len(tokens), text, is_last,
            frames=[1] * len(tokens), speech=list(speech), pieces=pieces))

    def test_flush(self):
        session, channel = self.session()
        session.message_received(audio_json(np.zeros(1000, np.float32)))
        steps = self.loop.steps
        session.message_received(b'{"type":"flush"}')
        # The chunk being filled is completed with silence and decoding asked for.
        self.assertEqual(session.stream.cutter.received, GEOMETRY.samples_needed(0))
        self.assertEqual(self.loop.steps, steps + 1)
        self.assertEqual(channel.of_type("result"), [])
        self.decoded(session, tokens=[4, 5])
        start, end = channel.of_type("result")
        self.assertEqual(start["turn_detection"], "start_of_utterance")
        self.assertEqual(end["turn_detection"], "end_of_utterance")
        self.assertEqual((end["utterance"]["text"], end["utterance"]["reason"]),
                         ("w4 w5", "flush"))
        self.assertEqual((end["text"], end["is_final"], end["token_ids"]), ("w4 w5", False, []))
        self.assertFalse(channel.closed)
        # The stream goes on.
        session.message_received(audio_json(np.zeros(1000, np.float32)))
        self.assertEqual(channel.of_type("error"), [])

    def test_flush_with_nothing_to_decode_answers_at_once(self):
        session, channel = self.session()
        session.message_received(b'{"type":"flush"}')
        (result,) = channel.of_type("result")
        self.assertEqual(result["utterance"]["text"], "")
        self.assertEqual(result["audio_ms"], 0.0)

    def test_flush_after_the_end(self):
        session, channel = self.session()
        session.message_received(b'{"type":"close"}')
        session.message_received(b'{"type":"flush"}')
        (error,) = channel.of_type("error")
        self.assertEqual(error["message"],
                         "flush after the end of the stream (close) was ignored")

    def test_config_sets_rate_and_encoding(self):
        session, channel = self.session()
        session.message_received(b'{"type":"config","sample_rate":8000,"encoding":"mulaw"}')
        self.assertEqual((session.stream.input_rate, session.encoding, session.binary_encoding),
                         (8000, "mulaw", "mulaw"))
        # Binary and JSON audio that name no encoding are mu-law now.
        session.audio_received(bytes(8000))
        session.message_received(json.dumps({"type": "audio", "data": "AAAA"}))
        self.assertEqual(session.stream.received, 8003)
        # 8 kHz is resampled to the model's 16 kHz.
        self.assertGreater(session.stream.cutter.received, 14000)
        self.assertEqual(channel.of_type("error"), [])

    def test_rate_can_only_change_before_audio(self):
        session, channel = self.session()
        session.message_received(audio_json(np.zeros(100, np.float32)))
        session.message_received(b'{"type":"config","sample_rate":8000}')
        session.message_received(json.dumps({"type": "audio", "sample_rate": 48000,
                                             "data": "AAAAAA=="}))
        first, second = channel.of_type("error")
        self.assertIn("sample_rate can only change before the first audio message",
                      first["message"])
        self.assertIn("sample_rate 48000 differs from the stream's 16000 Hz",
                      second["message"])
        self.assertEqual((session.stream.input_rate, session.stream.received), (16000, 100))
        # The same rate again is no change.
        session.message_received(json.dumps({"type": "audio", "sample_rate": 16000,
                                             "data": "AAAAAA=="}))
        self.assertEqual(session.stream.received, 102)

    def test_audio_declares_its_rate(self):
        session, channel = self.session()
        session.message_received(json.dumps({"type": "audio", "sample_rate": 44100,
                                             "data": "AAAAAA=="}))
        self.assertEqual(session.stream.input_rate, 44100)
        self.assertEqual(channel.of_type("error"), [])

    def test_rate_declared_on_connecting(self):
        channel = FakeChannel()
        session = StreamSession(self.registry, self.loop, Limits(), channel, "websocket")
        session.connection_made(sample_rate=48000, encoding="f32")
        self.assertEqual(channel.sent[0]["sample_rate"], 48000)
        # The URL's encoding is binary messages'; JSON audio stays pcm16.
        self.assertEqual((session.binary_encoding, session.encoding), ("f32", "pcm16"))

    def test_finalize_on_silence(self):
        from parakeet.server.turns import TurnSettings

        session, channel = self.session(turns=TurnSettings(finalize_silence_ms=320))
        session.turns.vad = True
        session.message_received(audio_json(np.zeros(3000, np.float32)))
        self.decoded(session, speech=[0.0] * 20)
        self.assertFalse(session.stream.finishing)  # silence, but no speech yet
        self.decoded(session, tokens=[3], speech=[0.9] * 5)
        self.decoded(session, speech=[0.0] * 9)
        self.assertFalse(session.stream.finishing)
        self.decoded(session, speech=[0.0] * 1)
        self.assertEqual(session.stream.end_reason, "silence")
        self.assertEqual(channel.of_type("error"), [])
