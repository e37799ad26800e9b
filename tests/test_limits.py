"""
Clients that go quiet, send too fast or stop reading, and the server
shutting down with streams open: over real loopback sockets.
"""

import socket

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from parakeet.clients import connection
from parakeet.server import messages

from .support.models import offline_tokens, quantized, speechlike
from .support.servers import ServerTestMixin, wait_for


class LimitTestsMixin(ServerTestMixin):

    @defer.inlineCallbacks
    def test_idle_timeout(self):
        self.start_server("--idle-timeout", "0.5")
        audio = speechlike(70, 0.7)
        client = yield self.connect()
        yield client.next()
        client.send_audio(audio)
        final = yield client.final()
        yield client.closed
        self.assertEqual(client.errors(),
                         ["no message for 0.5 s (--idle-timeout): the stream was finalized"])
        # What was sent before the timeout is all decoded.
        expected, _ = offline_tokens(self.engine, quantized(audio))
        self.assertEqual(self.assertResultsConsistent(client), expected)
        self.assertEqual(final["audio_ms"], 700.0)
        yield wait_for(lambda: len(self.server.registry) == 0)

    @defer.inlineCallbacks
    def test_pings_keep_a_stream_alive(self):
        self.start_server("--idle-timeout", "0.5")
        client = yield self.connect()
        yield client.next()
        for _ in range(8):
            client.send({"type": "ping"})
            yield task.deferLater(reactor, 0.15, lambda: None)
        self.assertEqual(client.errors(), [])
        self.assertEqual(len(self.server.registry), 1)

    @defer.inlineCallbacks
    def test_audio_faster_than_it_is_decoded(self):
        # 20 s of audio sent at once: the server reads no more than about
        # --max-backlog-seconds ahead of the decoder, and decodes it all.
        self.start_server("--max-backlog-seconds", "1")
        audio = speechlike(71, 20.0)
        client = yield self.connect()
        yield client.next()
        backlog = []
        watch = task.LoopingCall(lambda: backlog.extend(
            s.cutter.buffered_samples for s in self.server.registry.in_turn()))
        watch.start(0.005)
        try:
            final = yield self.stream(client, audio, piece=1600)
        finally:
            watch.stop()
        expected, _ = offline_tokens(self.engine, quantized(audio))
        self.assertEqual(self.assertResultsConsistent(client), expected)
        self.assertEqual(final["audio_ms"], 20000.0)
        self.assertLessEqual(max(backlog), 16000 + self.read_ahead)
        self.assertEqual(client.errors(), [])

    @defer.inlineCallbacks
    def test_shutdown_finalizes_open_streams(self):
        self.start_server()
        audios = [speechlike(72, 1.3), speechlike(73, 0.6)]
        connected = []
        for audio in audios:
            client = yield self.connect()
            yield client.next()
            client.send_audio(audio)
            connected.append(client)
        yield wait_for(lambda: all(s.received for s in self.server.registry.in_turn())
                       and len(self.server.registry) == 2)
        stopping = self.server.stopService()
        # Until the streams are done, newcomers are told why they are refused.
        late = yield self.connect()
        refusal = yield late.next()
        self.assertEqual(refusal, messages.error(messages.SHUTTING_DOWN))
        yield stopping
        for client, audio in zip(connected, audios):
            yield client.closed
            self.assertEqual(client.errors(),
                             ["the server is shutting down: the stream was finalized"])
            expected, _ = offline_tokens(self.engine, quantized(audio))
            self.assertEqual(self.assertResultsConsistent(client), expected)

    @defer.inlineCallbacks
    def test_shutdown_deadline(self):
        self.start_server("--drain-seconds", "0")
        client = yield self.connect()
        yield client.next()
        client.send_audio(speechlike(74, 3.0))
        yield wait_for(lambda: self.server.registry.in_turn()[0].received)
        yield self.server.stopService()
        yield client.closed
        self.assertEqual(client.errors()[-1],
                         "the server shut down before the stream was decoded to its "
                         "end (--drain-seconds=0)")
        self.assertEqual(len(self.server.registry), 0)

    @defer.inlineCallbacks
    def test_client_that_stops_reading(self):
        # The client reads nothing while it asks for many answers: the server
        # stops reading from it, then drops it after --write-timeout.
        self.start_server("--write-timeout", "0.5")
        client = yield self.connect()
        yield client.next()
        client_socket = client._proto.transport.getHandle()
        client_socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        (stream,) = self.server.registry.in_turn()
        session = stream.listener
        server_socket = session.channel.proto.transport.getHandle()
        server_socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        client._proto.transport.pauseProducing()
        ping = {"type": "ping"}
        for _ in range(20000):
            client.send(ping)
        yield wait_for(lambda: session.channel.flow.reasons)
        self.assertIn("unread output", session.channel.flow.reasons)
        yield wait_for(lambda: len(self.server.registry) == 0)
        self.assertFalse(session.connected)
        # A paused transport notices no disconnection: read again to see it.
        client._proto.transport.resumeProducing()
        yield client.closed

    def test_flow_control_is_registered(self):
        self.start_server()
        d = self.connect()

        @defer.inlineCallbacks
        def check(client):
            yield client.next()
            (stream,) = self.server.registry.in_turn()
            flow = stream.listener.channel.flow
            self.assertIs(stream.listener.channel.proto.transport.producer, flow)
            self.assertEqual(flow.reasons, set())
        return d.addCallback(check)


class TCPLimitTests(LimitTestsMixin, unittest.TestCase):
    transport = "tcp"
    read_ahead = 1600  # the message that crossed the limit


class WebSocketLimitTests(LimitTestsMixin, unittest.TestCase):
    transport = "ws"
    # Autobahn decodes every message of the data already read: up to one
    # 64 KiB read of base64 pcm16 (3 bytes of audio in 4).
    read_ahead = 65536 * 3 // 4 // 2 + 1600

    @defer.inlineCallbacks
    def test_server_pings(self):
        self.start_server("--ws-ping-interval", "2", "--idle-timeout", "0")
        pings = []
        factory_protocol = connection._WebSocketClientProtocol

        class Counting(factory_protocol):
            def onPing(self, payload):
                pings.append(payload)
                factory_protocol.onPing(self, payload)

        self.patch(connection, "_WebSocketClientProtocol", Counting)
        client = yield self.connect()
        yield client.next()
        # Autobahn rounds its timers down to whole seconds: intervals under
        # two seconds can time a ping out before its pong is back.
        yield wait_for(lambda: len(pings) >= 2, timeout=10)
        # The client answered them all, so it is still connected.
        self.assertFalse(client.closed.called)
