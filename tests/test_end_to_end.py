"""
The whole server over real loopback sockets: the service tree that
``parakeet-server serve`` builds, the tiny model through the NeMo pipeline,
and real clients (a LineReceiver for TCP, Autobahn for WebSocket).
"""

import base64
import json
import socket

import numpy as np
from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from parakeet.audio import encode_samples
from parakeet.clients import connection
from parakeet.server import messages

from .support.models import offline_tokens, quantized, speechlike
from .support.servers import PIECE, ServerTestMixin, wait_for


class StreamTestsMixin(ServerTestMixin):

    @defer.inlineCallbacks
    def test_hello(self):
        self.start_server()
        client = yield self.connect()
        hello = yield client.next()
        self.assertEqual(set(hello), {"type", "stream_id", "sample_rate", "model", "model_info"})
        self.assertEqual((hello["type"], hello["sample_rate"], hello["model"]),
                         ("hello", 16000, "tiny-replica.nemo"))
        self.assertIsInstance(hello["stream_id"], int)
        self.assertEqual(hello["model_info"], {
            "name": "tiny-replica.nemo", "device": "cpu", "precision": "float32",
            "chunk_ms": 160, "chunk_sizes_ms": [160], "sample_rate": 16000,
            "languages": ["en"], "language": "en"})

    @defer.inlineCallbacks
    def test_transcribes_like_offline(self):
        self.start_server()
        audio = speechlike(11, 3.0)
        client = yield self.connect()
        final = yield self.stream(client, audio)
        tokens = self.assertResultsConsistent(client)
        expected, _ = offline_tokens(self.engine, quantized(audio))
        self.assertEqual(tokens, expected)
        self.assertGreater(len(client.results()), 2)  # partial results came first
        self.assertEqual(final["text"].split(),
                         self.tokenizer().ids_to_text(expected).split())
        self.assertEqual(final["stream_id"], client.messages[0]["stream_id"])
        # Every result's text is the transcript so far, and says how much of
        # the audio it covers.
        covered = [r["audio_ms"] for r in client.results()]
        self.assertEqual(covered, sorted(covered))
        self.assertEqual(final["audio_ms"], 3000.0)
        for r in client.results():
            self.assertTrue(final["text"].startswith(r["text"]))
            self.assertTrue(0 < r["audio_ms"] <= 3000.0)
        yield client.closed  # the server hangs up after the final result

    @defer.inlineCallbacks
    def test_f32_audio(self):
        self.start_server()
        audio = speechlike(12, 1.5)
        client = yield self.connect()
        yield self.stream(client, audio, encoding="f32")
        expected, _ = offline_tokens(self.engine, audio)
        self.assertEqual(self.assertResultsConsistent(client), expected)

    @defer.inlineCallbacks
    def test_close_message_finalizes(self):
        self.start_server()
        audio = speechlike(13, 1.0)
        client = yield self.connect()
        yield client.next(lambda m: m["type"] == "hello")
        client.send_audio(audio)
        client.close()
        final = yield client.final()
        expected, _ = offline_tokens(self.engine, quantized(audio))
        self.assertEqual(self.assertResultsConsistent(client), expected)
        self.assertTrue(final["is_final"])
        yield client.closed

    @defer.inlineCallbacks
    def test_close_without_audio(self):
        self.start_server()
        client = yield self.connect()
        yield client.next()
        client.close()
        final = yield client.final()
        self.assertEqual((final["text"], final["token_ids"]), ("", []))
        yield client.closed

    @defer.inlineCallbacks
    def test_ping(self):
        self.start_server()
        client = yield self.connect()
        yield client.next()
        client.send({"type": "ping"})
        pong = yield client.next(lambda m: m["type"] == "pong")
        self.assertEqual(pong, {"type": "pong"})

    @defer.inlineCallbacks
    def test_bad_messages_get_errors_and_the_stream_goes_on(self):
        self.start_server()
        client = yield self.connect()
        yield client.next()
        audio = speechlike(14, 1.0)
        f32_nan = base64.b64encode(np.array([0.0, np.nan], "<f4").tobytes()).decode()
        bad = [
            (b"{not json", "invalid JSON"),
            (b"[1, 2]", "must be a JSON object"),
            (b'{"data": ""}', "unknown message type"),
            (b'{"type": "shout"}', "unknown message type"),
            (b'{"type": "audio", "data": "***"}', "not valid base64"),
            (b'{"type": "audio", "data": "AAAA", "encoding": "mp3"}',
             "unknown audio encoding"),
            (b'{"type": "audio", "data": "AAAA", "encoding": "pcm16"}',
             "even number of bytes"),
            (json.dumps({"type": "audio", "data": f32_nan, "encoding": "f32"}).encode(),
             "NaN or infinite"),
            (b'{"type": "audio", "data": "", "final": "yes"}', "'final' must be"),
            (b"\xff\xfe", "not valid UTF-8"),
        ]
        # The first half of the audio before the bad messages, the rest after:
        # nothing of it is lost.
        client.send_audio(audio[:8000])
        for raw, _ in bad:
            client.send_raw(raw)
        client.send_audio(audio[8000:], final=True)
        yield client.final()
        errors = client.errors()
        self.assertEqual(len(errors), len(bad))
        for message, (raw, fragment) in zip(errors, bad):
            self.assertIn(fragment, message, raw)
        expected, _ = offline_tokens(self.engine, quantized(audio))
        self.assertEqual(self.assertResultsConsistent(client), expected)

    @defer.inlineCallbacks
    def test_audio_after_final(self):
        self.start_server()
        client = yield self.connect()
        yield client.next()
        client.send_audio(speechlike(15, 0.5), final=True)
        client.send_audio(speechlike(16, 0.5))
        error = yield client.next(lambda m: m["type"] == "error")
        self.assertIn("audio after the end of the stream", error["message"])
        yield client.final()
        self.assertResultsConsistent(client)

    @defer.inlineCallbacks
    def test_message_over_the_size_limit(self):
        self.start_server("--max-message-bytes", "4096")
        client = yield self.connect()
        yield client.next()
        audio = speechlike(17, 1.0)
        client.send_audio(np.zeros(4096, np.float32))  # 8 KiB of pcm16: too large
        error = yield client.next(lambda m: m["type"] == "error")
        self.assertIn("message too large: the limit is 4096 bytes", error["message"])
        for start in range(0, len(audio), 1000):  # 2.7 KiB messages
            client.send_audio(audio[start:start + 1000], final=start + 1000 >= len(audio))
        yield client.final()
        expected, _ = offline_tokens(self.engine, quantized(audio))
        self.assertEqual(self.assertResultsConsistent(client), expected)

    @defer.inlineCallbacks
    def test_max_stream_seconds(self):
        self.start_server("--max-stream-seconds", "1")
        audio = speechlike(18, 2.0)
        client = yield self.connect()
        yield client.next()
        for start in range(0, len(audio), PIECE):
            client.send_audio(audio[start:start + PIECE])
        final = yield client.final()
        # One error says where the audio was cut; each message after it is
        # refused as coming after the end of the stream.
        errors = client.errors()
        self.assertIn("--max-stream-seconds=1", errors[0])
        self.assertIn("audio after 1.00 s was not decoded", errors[0])
        self.assertEqual(len(errors), 10)
        for error in errors[1:]:
            self.assertIn("audio after the end of the stream (max-stream-seconds)", error)
        # The first second was decoded, and only it.
        expected, _ = offline_tokens(self.engine, quantized(audio[:16000]))
        self.assertEqual(self.assertResultsConsistent(client), expected)
        self.assertTrue(final["is_final"])

    @defer.inlineCallbacks
    def test_max_num_streams_and_slot_reuse(self):
        self.start_server("--max-num-streams", "2")
        first = yield self.connect()
        second = yield self.connect()
        yield first.next()
        yield second.next()
        third = yield self.connect()
        refusal = yield third.next()
        self.assertEqual(refusal, {"type": "error",
                                   "message": "No free streaming state available."})
        yield third.closed
        status = yield self.status()
        self.assertEqual(status, {"type": "status", "connected_streams": 2,
                                  "max_streams": 2, "state": "full",
                                  "model_info": status["model_info"]})
        self.assertEqual(status["model_info"]["name"], "tiny-replica.nemo")
        # A finished stream's state is free for the next client.
        yield self.stream(first, speechlike(19, 0.5))
        yield wait_for(lambda: len(self.server.registry) == 1)
        fourth = yield self.connect()
        hello = yield fourth.next()
        self.assertEqual(hello["type"], "hello")
        audio = speechlike(20, 1.0)
        yield self.stream(fourth, audio)
        expected, _ = offline_tokens(self.engine, quantized(audio))
        self.assertEqual(self.assertResultsConsistent(fourth), expected)

    @defer.inlineCallbacks
    def test_abrupt_disconnect_releases_the_stream(self):
        self.start_server("--max-num-streams", "1")
        client = yield self.connect()
        yield client.next()
        client.send_audio(speechlike(21, 1.5))
        yield client.next(lambda m: m["type"] == "result")
        self.assertEqual((yield self.status())["connected_streams"], 1)
        client.disconnect()
        yield client.closed
        yield wait_for(lambda: len(self.server.registry) == 0)
        self.assertEqual((yield self.status())["connected_streams"], 0)
        # The one slot is free again.
        again = yield self.connect()
        self.assertEqual((yield again.next())["type"], "hello")

    @defer.inlineCallbacks
    def test_concurrent_streams_decode_as_alone(self):
        self.start_server()
        lengths = [2.0, 0.7, 1.3, 2.6]
        audios = [speechlike(30 + i, s) for i, s in enumerate(lengths)]
        connected = yield defer.gatherResults([self.connect() for _ in audios])
        yield defer.gatherResults([self.stream(c, a) for c, a in zip(connected, audios)])
        ids = {c.messages[0]["stream_id"] for c in connected}
        self.assertEqual(len(ids), len(audios))
        for client, audio in zip(connected, audios):
            expected, _ = offline_tokens(self.engine, quantized(audio))
            self.assertEqual(self.assertResultsConsistent(client), expected)
        self.assertLess(self.server.getServiceNamed("decoder").steps,
                        sum(len(a) for a in audios) / 2560)  # streams shared steps

    @defer.inlineCallbacks
    def test_results_are_not_held_back(self):
        """The server's end of a stream connection has Nagle's algorithm off."""
        self.start_server()
        client = yield self.connect()
        hello = yield client.next(lambda m: m["type"] == "hello")
        session = self.server.registry.get(hello["stream_id"]).listener
        sock = session.channel.proto.transport.getHandle()
        self.assertTrue(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    @defer.inlineCallbacks
    def test_status_port(self):
        self.start_server()
        status = yield self.status()
        self.assertEqual(status, {"type": "status", "connected_streams": 0,
                                  "max_streams": 100, "state": "ready",
                                  "model_info": status["model_info"]})
        a = yield self.connect()
        b = yield self.connect()
        yield a.next()
        yield b.next()
        self.assertEqual((yield self.status())["connected_streams"], 2)
        yield self.stream(a, speechlike(22, 0.3))
        yield wait_for(lambda: len(self.server.registry) == 1)
        self.assertEqual((yield self.status())["connected_streams"], 1)


class TurnTestsMixin(ServerTestMixin):
    """flush and config over a transport (the tiny model: words are random,
    what is checked is where results come and what they carry)."""

    @defer.inlineCallbacks
    def test_flush_ends_an_utterance_and_the_stream_goes_on(self):
        self.start_server()
        client = yield self.connect()
        yield client.next(lambda m: m["type"] == "hello")
        audio = speechlike(31, 2.0)
        first, second = audio[:17000], audio[17000:]
        for start in range(0, len(first), PIECE):
            client.send_audio(first[start:start + PIECE])
        client.send({"type": "flush"})
        flushed = yield client.next(lambda m: m["type"] == "result" and "utterance" in m
                                    and m["utterance"]["reason"] == "flush")
        self.assertEqual((flushed["turn_detection"], flushed["is_final"]),
                         ("end_of_utterance", False))
        utterance = flushed["utterance"]
        self.assertEqual(utterance["reason"], "flush")
        # Everything sent before the flush was decoded: the audio, and the
        # silence that completed its last chunk.
        self.assertGreaterEqual(flushed["audio_ms"], 17000 / 16)
        self.assertLess(flushed["audio_ms"], 17000 / 16 + 160 + 16)
        self.assertEqual(utterance["text"], " ".join(w["word"] for w in utterance["words"]))
        self.assertTrue(flushed["text"].endswith(utterance["text"]))
        for word in utterance["words"]:
            self.assertLess(word["start_ms"], word["end_ms"])
            self.assertLessEqual(word["end_ms"], flushed["audio_ms"] + 80)
            self.assertTrue(0 <= word["confidence"] <= 1)
        for start in range(0, len(second), PIECE):
            client.send_audio(second[start:start + PIECE], final=start + PIECE >= len(second))
        final = yield client.final()
        self.assertEqual(client.errors(), [])
        self.assertGreater(final["audio_ms"], flushed["audio_ms"])
        self.assertTrue(final["text"].startswith(flushed["text"]))
        indexes = [m["utterance"]["index"] for m in client.results() if "utterance" in m]
        self.assertEqual(indexes, list(range(len(indexes))))

    @defer.inlineCallbacks
    def test_config_declares_rate_and_encoding(self):
        self.start_server()
        client = yield self.connect()
        yield client.next(lambda m: m["type"] == "hello")
        client.send({"type": "config", "sample_rate": 8000, "encoding": "mulaw"})
        audio = speechlike(32, 1.0)[::2].copy()  # 1 s at 8 kHz
        payload = encode_samples(audio, "mulaw")
        for start in range(0, len(payload), 800):
            client.send({"type": "audio",
                         "data": base64.b64encode(payload[start:start + 800]).decode()})
        client.close()
        final = yield client.final()
        self.assertEqual(client.errors(), [])
        self.assertAlmostEqual(final["audio_ms"], 1000, delta=20)

    @defer.inlineCallbacks
    def test_config_asks_for_a_result_every_chunk(self):
        self.start_server()
        client = yield self.connect()
        client.send({"type": "config", "results": "every_chunk"})
        audio = np.zeros(16000 * 2, np.float32)  # silence: little news
        yield self.stream(client, audio)
        self.assertEqual(client.errors(), [])
        chunk_ms = self.engine.geometry.chunk_seconds * 1000
        steps = [m["audio_ms"] for m in client.results() if not m["is_final"]]
        self.assertEqual(steps, sorted(set(steps)))  # one a chunk
        self.assertGreaterEqual(len(steps), 2000 / chunk_ms - 2)

    @defer.inlineCallbacks
    def test_bad_config(self):
        self.start_server()
        client = yield self.connect()
        yield client.next(lambda m: m["type"] == "hello")
        client.send({"type": "config", "sample_rate": 96000})
        error = yield client.next(lambda m: m["type"] == "error")
        self.assertIn("sample_rate must be a whole number of Hz from 8000 to 48000",
                      error["message"])
        client.send({"type": "ping"})
        yield client.next(lambda m: m["type"] == "pong")


class TCPTurnTests(TurnTestsMixin, unittest.TestCase):
    transport = "tcp"


class WebSocketTurnTests(TurnTestsMixin, unittest.TestCase):
    transport = "ws"

    @defer.inlineCallbacks
    def test_rate_and_encoding_in_the_url(self):
        self.start_server()
        client = yield connection.connect(reactor, self.address() + "/?sample_rate=48000"
                                                                  "&encoding=f32")
        self.addCleanup(self._hang_up, client)
        hello = yield client.next()
        self.assertEqual(hello["sample_rate"], 48000)
        audio = np.repeat(speechlike(33, 1.0), 3)  # 1 s at 48 kHz
        for start in range(0, len(audio), 4800):
            client._proto.sendMessage(encode_samples(audio[start:start + 4800], "f32"),
                                      isBinary=True)
        client.close()
        final = yield client.final()
        self.assertEqual(client.errors(), [])
        self.assertAlmostEqual(final["audio_ms"], 1000, delta=20)

    @defer.inlineCallbacks
    def test_bad_rate_in_the_url_is_refused_at_the_handshake(self):
        self.start_server()
        for query in ("/?sample_rate=4000", "/?sample_rate=16k",
                      "/?sample_rate=" + "9" * 5000):
            with self.assertRaises(ConnectionError) as caught:
                yield connection.connect(reactor, self.address() + query)
            self.assertIn("400", str(caught.exception))
        self.assertEqual(len(self.server.registry), 0)


class TCPTests(StreamTestsMixin, unittest.TestCase):
    transport = "tcp"

    @defer.inlineCallbacks
    def test_line_over_the_limit_in_pieces(self):
        # A line longer than the limit that arrives in many pieces is refused
        # once, and the lines after it are read as usual.
        self.start_server("--max-message-bytes", "4096")
        client = yield self.connect()
        yield client.next()
        transport = client._proto.transport
        for _ in range(10):
            transport.write(b"x" * 1000)
            yield task.deferLater(reactor, 0.005, lambda: None)
        transport.write(b"\n" + messages.encode({"type": "ping"}) + b"\n")
        yield client.next(lambda m: m["type"] == "pong")
        self.assertEqual(len(client.errors()), 1)
        self.assertIn("message too large", client.errors()[0])

    @defer.inlineCallbacks
    def test_crlf_and_blank_lines(self):
        self.start_server()
        client = yield self.connect()
        yield client.next()
        client._proto.transport.write(b'\n\r\n{"type": "ping"}\r\n')
        yield client.next(lambda m: m["type"] == "pong")
        self.assertEqual(client.errors(), [])


class WebSocketTests(StreamTestsMixin, unittest.TestCase):
    transport = "ws"

    @defer.inlineCallbacks
    def binary_stream(self, audio, query="", encoding="pcm16"):
        """Stream audio as binary messages; finalize with a close message."""
        client = yield connection.connect(reactor, self.address() + query)
        self.addCleanup(self._hang_up, client)
        yield client.next()
        for start in range(0, len(audio), PIECE):
            client._proto.sendMessage(encode_samples(audio[start:start + PIECE], encoding),
                                      isBinary=True)
        client.close()
        yield client.final()
        return client

    @defer.inlineCallbacks
    def test_binary_pcm16_audio(self):
        self.start_server()
        audio = speechlike(23, 1.5)
        client = yield self.binary_stream(audio)
        expected, _ = offline_tokens(self.engine, quantized(audio))
        self.assertEqual(self.assertResultsConsistent(client), expected)
        self.assertEqual(client.errors(), [])

    @defer.inlineCallbacks
    def test_binary_f32_audio(self):
        self.start_server()
        audio = speechlike(24, 1.5)
        client = yield self.binary_stream(audio, "/?encoding=f32", "f32")
        expected, _ = offline_tokens(self.engine, audio)
        self.assertEqual(self.assertResultsConsistent(client), expected)

    @defer.inlineCallbacks
    def test_bad_binary_audio(self):
        self.start_server()
        client = yield self.connect()
        yield client.next()
        client._proto.sendMessage(b"\x00\x01\x02", isBinary=True)
        error = yield client.next(lambda m: m["type"] == "error")
        self.assertIn("pcm16 audio must have an even number of bytes, got 3",
                      error["message"])
        client.send({"type": "ping"})
        yield client.next(lambda m: m["type"] == "pong")

    @defer.inlineCallbacks
    def test_unknown_binary_encoding_is_refused_at_the_handshake(self):
        self.start_server()
        with self.assertRaises(ConnectionError) as caught:
            yield connection.connect(reactor, self.address() + "/?encoding=mp3")
        self.assertIn("400", str(caught.exception))
        self.assertEqual(len(self.server.registry), 0)

    @defer.inlineCallbacks
    def test_far_over_the_limit_fails_the_connection(self):
        # Past four times the limit Autobahn stops reading the message and
        # fails the connection (close code 1009) rather than buffer it.
        self.start_server("--max-message-bytes", "1024")
        client = yield self.connect()
        yield client.next()
        client.send_raw(b"x" * 8192)
        yield client.closed
        self.assertEqual(client._proto.remoteCloseCode, 1009)
        yield wait_for(lambda: len(self.server.registry) == 0)
