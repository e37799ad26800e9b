"""
The socket helpers (:mod:`parakeet.sockets`): a WebSocket stream reads the
same with Autobahn's private reader and without it, on both ends.
"""

from twisted.internet import defer
from twisted.trial import unittest

from parakeet import sockets

from .support.models import offline_tokens, quantized, speechlike
from .support.servers import ServerTestMixin


class WebSocketReadTests(ServerTestMixin, unittest.TestCase):

    transport = "websocket"

    def test_this_autobahn_has_the_private_reader(self):
        # Without it the server works, but spends more on every read.
        self.assertTrue(sockets.DIRECT_READ)

    @defer.inlineCallbacks
    def test_same_results_without_the_private_reader(self):
        self.start_server()
        audio = speechlike(5, 2.0)
        expected, _ = offline_tokens(self.engine, quantized(audio))
        for direct in (True, False):
            self.patch(sockets, "DIRECT_READ", direct)
            client = yield self.connect()
            yield self.stream(client, audio)
            self.assertEqual(self.assertResultsConsistent(client), expected)
            yield client.closed
