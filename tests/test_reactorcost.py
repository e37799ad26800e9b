"""
The reactor-cost benchmark runs and reports (no timing asserts).
"""

import io
import re
from contextlib import redirect_stdout

from twisted.trial import unittest

from parakeet import reactorcost


class ReactorCostTests(unittest.TestCase):

    def test_report(self):
        out = io.StringIO()
        with redirect_stdout(out):
            reactorcost.main(["--messages", "20", "--chunk-ms", "40"])
        lines = out.getvalue().splitlines()
        self.assertEqual(len(lines), 2)
        for line, name in zip(lines, ("JSON line", "binary message")):
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
