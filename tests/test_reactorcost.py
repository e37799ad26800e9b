"""
The reactor-cost benchmark runs and reports (no timing asserts).
"""

import io
import re
from contextlib import redirect_stdout

from twisted.trial import unittest

from parakeet.measuring import reactorcost


class ReactorCostTests(unittest.TestCase):

    def test_report(self):
        out = io.StringIO()
        with redirect_stdout(out):
            reactorcost.main(["--messages", "20", "--chunk-ms", "40"])
        lines = out.getvalue().splitlines()
        self.assertEqual(len(lines), 3)
        for line, name in zip(lines, ("JSON line", "binary message", "binary WebSocket")):
            self.assertTrue(line.startswith(name), line)
            self.assertRegex(line, r"\d+\.\d us per 40 ms message: one core feeds +\d+ "
                                   r"real-time streams")

    def test_messages_reach_the_stream(self):
        samples = reactorcost.np.zeros(1600, reactorcost.np.float32)
        registry, factory = reactorcost._streams(3)
        proto = factory.buildProtocol(None)
        proto.makeConnection(reactorcost.StringTransport())
        proto.session.audio_received(reactorcost.encode_samples(samples), "pcm16")
        (stream,) = registry.in_turn()
        self.assertEqual(stream.received, 1600)
        self.assertTrue(re.match(rb'\{"type":"hello"', proto.transport.value()))

    def test_websocket_frames_reach_the_stream(self):
        registry, proto = reactorcost._websocket()
        samples = reactorcost.np.zeros(1600, reactorcost.np.float32)
        frame = reactorcost.masked_binary_frame(reactorcost.encode_samples(samples))
        proto.dataReceived(frame)
        proto.dataReceived(frame[:7])
        proto.dataReceived(frame[7:])
        (stream,) = registry.in_turn()
        self.assertEqual(stream.received, 3200)

    def test_reads_skip_autobahns_debug_formatting(self):
        """The server's WebSocket protocol reads frames without formatting
        Autobahn's per-read debug line, which stock Autobahn does on every
        read even with debug logging off."""
        from autobahn.twisted import websocket

        registry, proto = reactorcost._websocket()
        formatted = []
        self.patch(websocket, "hltype", lambda *a: formatted.append(a) or "")
        self.patch(websocket, "hlval", lambda *a: formatted.append(a) or "")
        frame = reactorcost.masked_binary_frame(reactorcost.encode_samples(
            reactorcost.np.zeros(160, reactorcost.np.float32)))
        proto.dataReceived(frame)
        self.assertEqual(formatted, [])
        self.assertEqual(registry.in_turn()[0].received, 160)
        # What stock Autobahn would have done.
        websocket.WebSocketServerProtocol.dataReceived(proto, frame)
        self.assertNotEqual(formatted, [])
        self.assertEqual(registry.in_turn()[0].received, 320)
