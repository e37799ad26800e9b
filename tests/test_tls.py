"""
TLS for real: the server listens on ``ssl:`` endpoint strings with a
certificate the test makes, and real clients stream audio over TLS on both
transports, trusting that certificate.
"""


from twisted.internet import defer, reactor
from twisted.trial import unittest

from parakeet.clients import connection

from .support.models import offline_tokens, quantized, speechlike
from .support.servers import ServerTestMixin, make_certificate, ssl_endpoint


class TLSTests(ServerTestMixin, unittest.TestCase):

    def setUp(self):
        self.cert, self.key = make_certificate(self.mktemp())

    def start(self, *flags, cert=None, key=None):
        endpoint = ssl_endpoint(cert or self.cert, key or self.key)
        self.start_server("--listen-tcp", endpoint, "--listen-ws", endpoint, *flags)

    def tls(self):
        return "tls://127.0.0.1:%d" % (self.ports["TCP clients"],)

    def wss(self):
        return "wss://localhost:%d/" % (self.ports["WebSocket clients"],)

    @defer.inlineCallbacks
    def open(self, address, **kwargs):
        client = yield connection.connect(reactor, address, **kwargs)
        self.addCleanup(self._hang_up, client)
        return client

    @defer.inlineCallbacks
    def check_stream(self, client, seed):
        audio = speechlike(seed, 1.0)
        final = yield self.stream(client, audio)
        expected, _ = offline_tokens(self.engine, quantized(audio))
        self.assertEqual(self.assertResultsConsistent(client), expected)
        self.assertEqual(final["text"].split(),
                         self.tokenizer().ids_to_text(expected).split())
        self.assertEqual(client.errors(), [])
        yield client.closed

    @defer.inlineCallbacks
    def test_both_transports_over_tls(self):
        self.start()
        tcp, ws = yield defer.gatherResults([self.open(self.tls(), trust=self.cert),
                                             self.open(self.wss(), trust=self.cert)])
        yield defer.gatherResults([self.check_stream(tcp, 70), self.check_stream(ws, 71)])

    @defer.inlineCallbacks
    def test_tls_with_tokens(self):
        tokens = self.mktemp()
        with open(tokens, "w") as f:
            f.write("tls-token-1\n")
        self.start("--auth-tokens", tokens)
        tcp = yield self.open(self.tls(), trust=self.cert, token="tls-token-1")
        yield self.check_stream(tcp, 72)
        ws = yield self.open(self.wss(), trust=self.cert, token="wrong")
        error = yield ws.next(lambda m: m["type"] == "error")
        self.assertIn("wrong token", error["message"])
        yield ws.closed
        self.assertEqual(ws.close_code, 1008)

    @defer.inlineCallbacks
    def test_plain_text_client_fails(self):
        self.start()
        plain = yield self.open("tcp://127.0.0.1:%d" % (self.ports["TCP clients"],))
        plain.send({"type": "ping"})
        yield plain.closed
        self.assertEqual(plain.messages, [])
        with self.assertRaises(ConnectionError):
            yield self.open("ws://127.0.0.1:%d/" % (self.ports["WebSocket clients"],))
        self.assertEqual(len(self.server.registry), 0)

    @defer.inlineCallbacks
    def test_untrusted_certificate_fails(self):
        # The system's trust store does not know the test's certificate.
        self.start()
        from OpenSSL.SSL import Error as SSLError

        client = yield self.open(self.tls())
        yield client.closed
        self.assertEqual(client.messages, [])
        with self.assertRaises((SSLError, ConnectionError)):
            yield self.open(self.wss())
        self.assertEqual(len(self.server.registry), 0)

    @defer.inlineCallbacks
    def test_wrong_name_fails(self):
        # A certificate the client trusts, but for another name.
        cert, key = make_certificate(self.mktemp(), names=("speech.example.com",),
                                     addresses=())
        self.start(cert=cert, key=key)
        client = yield self.open(self.tls(), trust=cert)
        yield client.closed
        self.assertEqual(client.messages, [])
        self.assertEqual(len(self.server.registry), 0)

    @defer.inlineCallbacks
    def test_no_tls_handshake_takes_no_stream(self):
        # A client that connects to the TLS port and says nothing holds no
        # stream, and is dropped after --idle-timeout.
        self.start("--idle-timeout", "0.5")
        silent = yield self.open("tcp://127.0.0.1:%d" % (self.ports["TCP clients"],))
        self.assertEqual(len(self.server.registry), 0)
        started = reactor.seconds()
        yield silent.closed
        self.assertGreaterEqual(reactor.seconds() - started, 0.4)
        self.assertEqual(silent.messages, [])
        self.assertEqual(len(self.server.registry), 0)
