"""
The Prometheus metrics: a real registry, decode loop and sessions move them,
and a scrape of the metrics resource shows it.
"""

import json

import numpy as np
from twisted.internet import defer, reactor
from twisted.internet.testing import MemoryReactorClock
from twisted.trial import unittest
from twisted.web import server
from twisted.web.client import Agent, readBody
from twisted.web.http_headers import Headers

from parakeet.server import messages
from parakeet.server.decodeloop import DecodeLoop
from parakeet.server.metrics import ERROR_KINDS, ServerMetrics
from parakeet.server.protocol import Limits, StreamSession
from parakeet.server.registry import ModelInfo, RegistryLoading, StreamRegistry

from .support.fakes import FakeChannel, FakeEngine
from .support.models import GEOMETRY, assert_engine_idle, shared_tiny_engine, speechlike
from .support.servers import Scraped, audio_json, parse, scrape, wait_for

#: Samples the first chunk needs; each later chunk needs CHUNK more.
FIRST = GEOMETRY.samples_needed(0)
CHUNK = GEOMETRY.chunk_frames * GEOMETRY.hop


class MetricsCase(unittest.TestCase):
    """A registry of two streams, a decode loop with the fake engine on a
    fake clock (steps run at once unless a test holds them), and sessions
    over fake channels."""

    def setUp(self):
        self.clock = MemoryReactorClock()
        self.registry = StreamRegistry(2, GEOMETRY, 16000, self.clock)
        self.engine = FakeEngine(GEOMETRY)
        self.held = None  # steps waiting for the test to finish them, when held
        self.failing = False
        self.loop = DecodeLoop(self.engine, self.registry, self.clock, interval=0.01,
                               run_step=self.run_step)
        self.loop.startService()
        self.addCleanup(self.loop.stopService)
        self.metrics = ServerMetrics(process=False)
        self.metrics.attach(self.registry, self.loop, self.engine)

    def run_step(self, function, *args):
        if self.failing:
            return defer.fail(RuntimeError("CUDA out of memory"))
        if self.held is not None:
            d = defer.Deferred()
            self.held.append((d, function, args))
            return d
        return defer.maybeDeferred(function, *args)

    def finish_held_step(self):
        d, function, args = self.held.pop(0)
        d.callback(function(*args))

    def session(self, transport="tcp", **limits):
        channel = FakeChannel()
        session = StreamSession(self.registry, self.loop, Limits(**limits), channel,
                                transport)
        session.connection_made()
        return session, channel

    def scrape(self):
        samples, _ = scrape(self.metrics)
        return Scraped(samples)


class StreamMetricsTests(MetricsCase):

    def test_known_labels_start_at_zero(self):
        m = self.scrape()
        self.assertEqual(m("parakeet_streams_opened_total", transport="tcp"), 0)
        self.assertEqual(m("parakeet_streams_opened_total", transport="websocket"), 0)
        for reason in ("final", "close", "disconnected", "idle_timeout",
                       "max_stream_seconds", "silence", "shutdown", "drain_timeout",
                       "engine_error"):
            self.assertEqual(m("parakeet_streams_closed_total", reason=reason), 0)
        for reason in ("full", "draining", "loading"):
            self.assertEqual(m("parakeet_streams_refused_total", reason=reason), 0)
        for kind in ERROR_KINDS:
            self.assertEqual(m("parakeet_errors_sent_total", kind=kind), 0)
        self.assertEqual(m("parakeet_streams_active"), 0)
        self.assertEqual(m("parakeet_streams_free"), 2)
        self.assertEqual(m("parakeet_streams_capacity"), 2)
        self.assertEqual(m("parakeet_decode_step_seconds_count"), 0)
        self.assertFalse(m.has("parakeet_real_time_factor"))

    def test_open_refuse_decode_error_close(self):
        a, a_channel = self.session("tcp")
        b, b_channel = self.session("websocket")
        c, c_channel = self.session("tcp")
        self.assertEqual(c_channel.sent, [messages.error(messages.NO_FREE_STATE)])
        m = self.scrape()
        self.assertEqual(m("parakeet_streams_opened_total", transport="tcp"), 1)
        self.assertEqual(m("parakeet_streams_opened_total", transport="websocket"), 1)
        self.assertEqual(m("parakeet_streams_refused_total", reason="full"), 1)
        self.assertEqual(m("parakeet_errors_sent_total", kind="full"), 1)
        self.assertEqual(m("parakeet_streams_active"), 2)
        self.assertEqual(m("parakeet_streams_free"), 0)

        a.message_received(b'{"type": "audio", "data": ')
        a.message_received(b'{"type": "shout"}')
        a.message_received(audio_json(data="not base64!"))
        self.assertEqual(len(a_channel.of_type("error")), 3)
        m = self.scrape()
        self.assertEqual(m("parakeet_errors_sent_total", kind="bad_json"), 1)
        self.assertEqual(m("parakeet_errors_sent_total", kind="unknown_type"), 1)
        self.assertEqual(m("parakeet_errors_sent_total", kind="bad_audio"), 1)

        # Two chunks of a, one of b, read in one turn of the reactor: a step
        # of both, then one of a alone.
        a.message_received(audio_json(np.zeros(FIRST + CHUNK, np.float32)))
        b.message_received(audio_json(np.zeros(FIRST, np.float32)))
        self.clock.advance(0.01)
        self.clock.advance(0.01)
        self.assertEqual(self.engine.batches, [[1, 2], [1]])
        m = self.scrape()
        self.assertEqual(m("parakeet_decode_step_seconds_count"), 2)
        self.assertEqual(m("parakeet_decode_batch_size_count"), 2)
        self.assertEqual(m("parakeet_decode_batch_size_sum"), 3)
        self.assertEqual(m("parakeet_decode_batch_size_bucket", le="1.0"), 1)
        self.assertEqual(m("parakeet_decode_batch_size_bucket", le="2.0"), 2)
        self.assertEqual(m("parakeet_result_latency_seconds_count"), 3)
        self.assertAlmostEqual(m("parakeet_decoded_audio_seconds_total"),
                               (2 * FIRST + CHUNK) / 16000)
        # Audio that does not complete a chunk waits, undecoded.
        backlog = m("parakeet_audio_backlog_seconds")
        a.message_received(audio_json(np.zeros(1600, np.float32)))
        self.assertAlmostEqual(self.scrape()("parakeet_audio_backlog_seconds"),
                               backlog + 0.1)

        a.message_received(b'{"type": "close"}')
        self.clock.advance(0.01)
        self.assertTrue(a_channel.closed)
        b.connection_lost()
        self.clock.advance(0.01)
        m = self.scrape()
        self.assertEqual(m("parakeet_streams_closed_total", reason="close"), 1)
        self.assertEqual(m("parakeet_streams_closed_total", reason="disconnected"), 1)
        self.assertEqual(m("parakeet_streams_active"), 0)
        self.assertEqual(m("parakeet_streams_free"), 2)
        self.assertAlmostEqual(m("parakeet_decoded_audio_seconds_total"),
                               (2 * FIRST + CHUNK + 1600) / 16000)
        self.assertEqual(m("parakeet_decode_step_seconds_count"), len(self.engine.batches))

    def test_result_latency_and_step_time(self):
        self.held = []
        a, _ = self.session()
        b, _ = self.session()
        a.message_received(audio_json(np.zeros(FIRST, np.float32)))
        self.clock.advance(0)  # step 1 starts on the reactor's next turn
        self.clock.advance(0.02)
        b.message_received(audio_json(np.zeros(FIRST, np.float32)))  # waits for it
        self.clock.advance(0.03)
        self.finish_held_step()
        self.clock.advance(0)  # the loop starts the next step at once
        self.clock.advance(0.04)
        self.finish_held_step()
        self.assertEqual(self.engine.batches, [[1], [2]])
        m = self.scrape()
        # a: 0.05 s from its chunk's audio to its result; b: 0.07 s, of
        # which 0.03 s waiting for a's step.
        self.assertEqual(m("parakeet_result_latency_seconds_count"), 2)
        self.assertAlmostEqual(m("parakeet_result_latency_seconds_sum"), 0.12)
        self.assertEqual(m("parakeet_result_latency_seconds_bucket", le="0.02"), 0)
        self.assertEqual(m("parakeet_result_latency_seconds_bucket", le="0.05"), 1)
        self.assertEqual(m("parakeet_result_latency_seconds_bucket", le="0.1"), 2)
        self.assertEqual(m("parakeet_result_latency_seconds_bucket", le="+Inf"), 2)
        self.assertEqual(m("parakeet_decode_step_seconds_count"), 2)
        self.assertAlmostEqual(m("parakeet_decode_step_seconds_sum"), 0.09)
        self.assertEqual(m("parakeet_decode_step_seconds_bucket", le="0.03"), 0)
        self.assertEqual(m("parakeet_decode_step_seconds_bucket", le="0.05"), 2)
        # 0.05 s, then 0.04 s, per 0.16 s chunk, averaged.
        chunk = GEOMETRY.chunk_seconds
        self.assertAlmostEqual(m("parakeet_real_time_factor"),
                               0.05 / chunk + 0.1 * (0.04 / chunk - 0.05 / chunk))

    def test_chunks_queued_count_from_the_step_before(self):
        # Three chunks at once, decoded one step after another, 0.1 s each:
        # each after the first waits from when the one before it was taken
        # for decoding, not from when its audio came.
        self.held = []
        a, _ = self.session()
        a.message_received(audio_json(np.zeros(FIRST + 2 * CHUNK, np.float32)))
        self.clock.advance(0)
        for _ in range(3):
            self.clock.advance(0.1)
            self.finish_held_step()
            self.clock.advance(0)
        m = self.scrape()
        self.assertEqual(m("parakeet_result_latency_seconds_count"), 3)
        # 0.1 (0 to 0.1), 0.2 (0 to 0.2), 0.2 (0.1 to 0.3)
        self.assertAlmostEqual(m("parakeet_result_latency_seconds_sum"), 0.5)

    def test_final_result_latency(self):
        self.held = []
        a, _ = self.session()
        # Less than a chunk: decoded only once the stream ends.
        a.message_received(audio_json(np.zeros(500, np.float32)))
        self.clock.advance(1.0)
        a.message_received(audio_json(np.zeros(500, np.float32), final=True))
        self.clock.advance(0)
        self.clock.advance(0.25)
        self.finish_held_step()
        m = self.scrape()
        self.assertEqual(m("parakeet_result_latency_seconds_count"), 1)
        self.assertAlmostEqual(m("parakeet_result_latency_seconds_sum"), 0.25)
        self.assertEqual(m("parakeet_streams_closed_total", reason="final"), 1)

    def test_failed_step(self):
        a, a_channel = self.session()
        self.failing = True
        a.message_received(audio_json(np.zeros(FIRST, np.float32), final=True))
        self.clock.advance(0)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        m = self.scrape()
        self.assertEqual(m("parakeet_streams_closed_total", reason="engine_error"), 1)
        self.assertEqual(m("parakeet_streams_closed_total", reason="final"), 0)
        self.assertEqual(m("parakeet_errors_sent_total", kind="internal"), 1)
        self.assertEqual(m("parakeet_decode_step_seconds_count"), 0)

    def test_timeouts_and_limits(self):
        a, _ = self.session(idle_timeout=5.0)
        b, _ = self.session(max_stream_seconds=0.1)
        b.message_received(audio_json(np.zeros(2000, np.float32)))
        b.message_received(audio_json(np.zeros(100, np.float32)))  # after the end
        self.clock.advance(5.0)
        for _ in range(5):
            self.clock.advance(0.01)
        m = self.scrape()
        self.assertEqual(m("parakeet_errors_sent_total", kind="idle_timeout"), 1)
        self.assertEqual(m("parakeet_errors_sent_total", kind="max_stream_seconds"), 1)
        self.assertEqual(m("parakeet_errors_sent_total", kind="after_end"), 1)
        self.assertEqual(m("parakeet_streams_closed_total", reason="idle_timeout"), 1)
        self.assertEqual(m("parakeet_streams_closed_total", reason="max_stream_seconds"), 1)
        # b's audio up to the limit was all decoded.
        self.assertAlmostEqual(m("parakeet_decoded_audio_seconds_total"), 0.1)

    def test_sample_rate_errors(self):
        a, _ = self.session()
        a.message_received(audio_json(np.zeros(160, np.float32)))
        a.message_received(json.dumps({"type": "config", "sample_rate": 8000}))
        a.message_received(json.dumps({"type": "config", "sample_rate": 1}))
        a.audio_received(b"\x00")  # an odd number of pcm16 bytes
        a.message_too_large(5000000)
        m = self.scrape()
        self.assertEqual(m("parakeet_errors_sent_total", kind="bad_sample_rate"), 2)
        self.assertEqual(m("parakeet_errors_sent_total", kind="bad_audio"), 1)
        self.assertEqual(m("parakeet_errors_sent_total", kind="too_large"), 1)

    def test_drain(self):
        a, _ = self.session()
        b, _ = self.session()
        a.message_received(audio_json(np.zeros(FIRST + 100, np.float32)))
        drained = self.loop.drain(1.0)
        c, c_channel = self.session()
        self.assertEqual(c_channel.sent, [messages.error(messages.SHUTTING_DOWN)])
        m = self.scrape()
        self.assertEqual(m("parakeet_draining"), 1)
        self.assertEqual(m("parakeet_streams_refused_total", reason="draining"), 1)
        self.assertEqual(m("parakeet_errors_sent_total", kind="draining"), 1)
        for _ in range(3):
            self.clock.advance(0.02)
        self.successResultOf(drained)
        m = self.scrape()
        self.assertEqual(m("parakeet_streams_closed_total", reason="shutdown"), 2)
        self.assertEqual(m("parakeet_errors_sent_total", kind="shutdown"), 2)

    def test_drain_runs_out_of_time(self):
        self.held = []
        self.engine.abort = lambda stream_ids: None
        a, a_channel = self.session()
        b, b_channel = self.session()
        a.message_received(audio_json(np.zeros(FIRST, np.float32)))
        self.clock.advance(0)  # a step in flight
        drained = self.loop.drain(1.0)
        for _ in range(60):
            self.clock.advance(0.02)
        self.finish_held_step()  # the step in flight when the time ran out
        self.finish_held_step()  # forgetting both streams' state
        self.successResultOf(drained)
        m = self.scrape()
        self.assertEqual(m("parakeet_streams_closed_total", reason="drain_timeout"), 2)
        self.assertEqual(m("parakeet_streams_closed_total", reason="shutdown"), 0)
        # Told it is finalized, then that it could not be decoded to its end.
        self.assertEqual(m("parakeet_errors_sent_total", kind="shutdown"), 4)
        self.assertEqual([e["message"][:28] for e in a_channel.of_type("error")],
                         ["the server is shutting down:", "the server shut down before "])

    def test_refusals_from_elsewhere(self):
        self.metrics.refused("unauthorized")
        self.registry.metrics.refused("unauthorized")
        self.registry.metrics.error_sent("unauthorized")
        m = self.scrape()
        self.assertEqual(m("parakeet_streams_refused_total", reason="unauthorized"), 2)
        self.assertEqual(m("parakeet_errors_sent_total", kind="unauthorized"), 1)

    def test_model(self):
        self.assertFalse(self.scrape().has("parakeet_model_info", model="fake", device="cpu",
                                           precision="float32", chunk_sizes_ms="80,160",
                                           languages="de,en", language="en"))
        self.registry.model = ModelInfo("fake", "cpu", "float32", 160, [80, 160], 16000,
                                        ["de", "en"], "en")
        m = self.scrape()
        self.assertEqual(m("parakeet_model_loaded"), 1)
        self.assertEqual(m("parakeet_model_info", model="fake", device="cpu",
                           precision="float32", chunk_sizes_ms="80,160", languages="de,en",
                           language="en"), 1)
        self.assertEqual(m("parakeet_chunk_seconds"), GEOMETRY.chunk_seconds)
        self.assertEqual(m("parakeet_decode_max_batch"), 2)


class BeforeAttachTests(unittest.TestCase):

    def test_scrape_before_anything_is_attached(self):
        m = Scraped(scrape(ServerMetrics(process=False))[0])
        self.assertEqual(m("parakeet_streams_active"), 0)
        self.assertEqual(m("parakeet_streams_free"), 0)
        self.assertEqual(m("parakeet_model_loaded"), 0)
        self.assertEqual(m("parakeet_draining"), 0)
        self.assertEqual(m("parakeet_streams_opened_total", transport="tcp"), 0)
        self.assertFalse([key for key in m.samples if key[0] == "parakeet_model_info"])

    def test_refusals_while_the_model_loads(self):
        # The registry exists before the model: attached alone, it counts
        # the streams it refuses meanwhile.
        clock = MemoryReactorClock()
        registry = StreamRegistry(3, None, 16000, clock)
        metrics = ServerMetrics(process=False)
        metrics.attach(registry)
        self.assertRaises(RegistryLoading, registry.open, "peer", "websocket", None)
        m = Scraped(scrape(metrics)[0])
        self.assertEqual(m("parakeet_streams_refused_total", reason="loading"), 1)
        self.assertEqual(m("parakeet_streams_capacity"), 3)
        self.assertEqual(m("parakeet_model_loaded"), 0)
        # Then the model is loaded.
        engine = FakeEngine(GEOMETRY)
        registry.geometry = GEOMETRY
        loop = DecodeLoop(engine, registry, clock, run_step=defer.maybeDeferred)
        metrics.attach(registry, loop, engine)
        StreamSession(registry, loop, Limits(), FakeChannel(), "websocket").connection_made()
        m = Scraped(scrape(metrics)[0])
        self.assertEqual(m("parakeet_model_loaded"), 1)
        self.assertEqual(m("parakeet_streams_opened_total", transport="websocket"), 1)
        self.assertEqual(m("parakeet_streams_refused_total", reason="loading"), 1)

    def test_servers_count_apart(self):
        clock = MemoryReactorClock()
        one, two = ServerMetrics(process=False), ServerMetrics(process=False)
        for metrics in (one, two):
            metrics.attach(StreamRegistry(1, GEOMETRY, 16000, clock))
        one.registry.open("peer", "tcp", None)
        self.assertEqual(Scraped(scrape(one)[0])("parakeet_streams_opened_total",
                                                 transport="tcp"), 1)
        self.assertEqual(Scraped(scrape(two)[0])("parakeet_streams_opened_total",
                                                 transport="tcp"), 0)


class ErrorKindTests(unittest.TestCase):
    """Every error the parser raises has a stable kind."""

    def kind(self, raw):
        with self.assertRaises(messages.ProtocolError) as caught:
            messages.parse(raw)
        self.assertIn(caught.exception.kind, ERROR_KINDS)
        return caught.exception.kind

    def test_kinds(self):
        for raw, kind in [
                (b"\xff", "bad_json"),
                (b"{", "bad_json"),
                (b"[" * 100000, "bad_json"),
                (b"[1]", "bad_json"),
                (b"{}", "unknown_type"),
                (b'{"type": 3}', "unknown_type"),
                (b'{"type": "shout"}', "unknown_type"),
                (b'{"type": "audio", "final": 1}', "bad_message"),
                (b'{"type": "audio", "data": 3}', "bad_message"),
                (b'{"type": "audio", "encoding": 3}', "bad_message"),
                (b'{"type": "audio", "data": "@@@"}', "bad_audio"),
                (b'{"type": "audio", "data": "AA=="}', "bad_audio"),
                (b'{"type": "audio", "data": "AA==", "encoding": "f32"}', "bad_audio"),
                (b'{"type": "audio", "data": "AAAAAA==", "encoding": "f32"}', None),
                (b'{"type": "audio", "encoding": "opus"}', "bad_audio"),
                (b'{"type": "config", "encoding": "opus"}', "bad_audio"),
                (b'{"type": "config", "sample_rate": 100}', "bad_sample_rate"),
                (b'{"type": "audio", "sample_rate": "fast"}', "bad_sample_rate")]:
            if kind is None:
                messages.parse(raw)  # valid: a sanity check of the cases above
                continue
            self.assertEqual(self.kind(raw), kind, raw[:40])


class ScrapeOverHTTPTests(unittest.TestCase):
    """The resource on a real HTTP port, scraped with a real client, while
    the tiny model decodes a stream on the model thread."""

    def setUp(self):
        self.engine = shared_tiny_engine()
        self.registry = StreamRegistry(4, self.engine.geometry, 16000, reactor)
        self.loop = DecodeLoop(self.engine, self.registry, reactor)
        self.loop.startService()
        self.addCleanup(self.loop.stopService)
        self.metrics = ServerMetrics()
        self.metrics.attach(self.registry, self.loop, self.engine)
        port = reactor.listenTCP(0, server.Site(self.metrics.resource()),
                                 interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.url = b"http://127.0.0.1:%d/metrics" % (port.getHost().port,)
        self.agent = Agent(reactor)

    @defer.inlineCallbacks
    def get(self, accept=None):
        headers = Headers({b"accept": [accept]} if accept else {})
        response = yield self.agent.request(b"GET", self.url, headers)
        body = yield readBody(response)
        self.assertEqual(response.code, 200)
        return response.headers.getRawHeaders(b"content-type")[0], body.decode("utf-8")

    @defer.inlineCallbacks
    def test_scrape(self):
        channel = FakeChannel()
        session = StreamSession(self.registry, self.loop, Limits(), channel, "tcp")
        session.connection_made()
        audio = speechlike(5, 1.0)
        for start in range(0, 16000, 1600):
            session.message_received(audio_json(audio[start:start + 1600],
                                                final=start + 1600 >= 16000))
        session.message_received(b"not json")
        yield wait_for(lambda: channel.closed and len(self.registry) == 0)
        content_type, text = yield self.get()
        self.assertTrue(content_type.startswith(b"text/plain"), content_type)
        m = Scraped(parse(text))
        self.assertEqual(m("parakeet_streams_opened_total", transport="tcp"), 1)
        self.assertEqual(m("parakeet_streams_closed_total", reason="final"), 1)
        self.assertEqual(m("parakeet_errors_sent_total", kind="bad_json"), 1)
        self.assertAlmostEqual(m("parakeet_decoded_audio_seconds_total"), 1.0)
        self.assertEqual(m("parakeet_decode_step_seconds_count"), self.loop.steps)
        self.assertEqual(m("parakeet_result_latency_seconds_count"), self.loop.steps)
        self.assertGreater(m("parakeet_result_latency_seconds_sum"), 0)
        self.assertGreater(m("parakeet_real_time_factor"), 0)
        self.assertEqual(m("parakeet_streams_active"), 0)
        self.assertGreater(m("process_resident_memory_bytes"), 0)
        assert_engine_idle(self, self.engine)

    @defer.inlineCallbacks
    def test_openmetrics(self):
        content_type, text = yield self.get(b"application/openmetrics-text; version=1.0.0")
        self.assertTrue(content_type.startswith(b"application/openmetrics-text"),
                        content_type)
        self.assertTrue(text.endswith("# EOF\n"))
        self.assertIn("parakeet_streams_opened_total{transport=\"tcp\"} 0.0", text)
