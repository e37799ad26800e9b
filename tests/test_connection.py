"""
parakeet.clients.connection without a server: addresses, trust files, and
messages in and out of a StreamClient.  (It is used against real servers
throughout the end-to-end, auth and TLS tests, and by the bench.)
"""

from twisted.internet import reactor
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from parakeet.clients import connection

from .support.servers import make_certificate


class AddressTests(unittest.TestCase):

    def test_bad_addresses(self):
        for address in ("http://127.0.0.1:8000", "127.0.0.1:8765", "tcp://127.0.0.1",
                        "tls://:8765", "tcp://127.0.0.1:port", "tcp://127.0.0.1:70000"):
            with self.assertRaises(ValueError, msg=address):
                connection.connect(reactor, address)

    def test_schemes(self):
        seen = []
        self.patch(connection, "connect_tcp", lambda *a, **k: seen.append(("tcp", a[1:], k)))
        self.patch(connection, "connect_websocket",
                   lambda *a, **k: seen.append(("ws", a[1:], k)))
        connection.connect(reactor, "tcp://[::1]:8765")
        connection.connect(reactor, "TLS://speech.example.com:443", token="t", trust="ca.pem")
        connection.connect(reactor, "wss://speech.example.com/ws", token="t")
        self.assertEqual(seen, [
            ("tcp", ("::1", 8765), {"token": None, "tls": False, "trust": None}),
            ("tcp", ("speech.example.com", 443), {"token": "t", "tls": True, "trust": "ca.pem"}),
            ("ws", ("wss://speech.example.com/ws",), {"token": "t", "trust": None})])


class TrustTests(unittest.TestCase):

    def test_several_certificates_in_one_file(self):
        first, _ = make_certificate(self.mktemp())
        second, _ = make_certificate(self.mktemp(), names=("speech.example.com",))
        bundle = self.mktemp()
        with open(bundle, "wb") as out:
            for path in (first, second):
                with open(path, "rb") as f:
                    out.write(b"# a comment\n" + f.read())
        self.assertEqual(len(connection._certificates(bundle)), 2)
        connection.tls_options("localhost", bundle)  # usable as a trust root

    def test_no_certificate(self):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("not a certificate\n")
        with self.assertRaises(ValueError) as caught:
            connection._certificates(path)
        self.assertIn("holds no PEM certificate", str(caught.exception))


class StreamClientTests(unittest.TestCase):

    def line_client(self, client=None):
        client = client or connection.StreamClient()
        proto = connection._LineClientProtocol(client)
        transport = StringTransport()
        proto.makeConnection(transport)
        return client, proto, transport

    def test_kept_messages(self):
        client, proto, _ = self.line_client()
        seen = []
        client.on_message = seen.append
        final = client.final()
        proto.dataReceived(b'{"type": "hello"}\n\n{"type": "result", "is_final": true}\n')
        self.assertEqual(seen, [{"type": "hello"}, {"type": "result", "is_final": True}])
        self.assertEqual(client.messages, seen)
        self.assertEqual(self.successResultOf(final), seen[1])
        self.assertEqual(client.results(), seen[1:])

    def test_messages_not_kept(self):
        client, proto, _ = self.line_client(connection.StreamClient(keep_messages=False))
        seen = []
        client.on_message = seen.append
        proto.dataReceived(b'{"type": "hello"}\n')
        final = client.final()
        proto.dataReceived(b'{"type": "result", "is_final": true}\n')
        self.assertEqual(len(seen), 2)
        self.assertEqual(client.messages, [])
        self.assertEqual(self.successResultOf(final), seen[1])

    def test_unreadable(self):
        client, _, _ = self.line_client()
        with self.assertRaises(ValueError):
            client._received(b"not json")
        unreadable = []
        client.on_unreadable = unreadable.append
        for data in (b"not json", b"[1, 2]", b'"text"'):
            client._received(data)
        client._received(b'{"type": "hello"}')
        self.assertEqual(unreadable, [b"not json", b"[1, 2]", b'"text"'])
        self.assertEqual(client.messages, [{"type": "hello"}])

    def test_send_frame_over_tcp(self):
        # Bytes already framed go out as they are; messages get their newline.
        client, _, transport = self.line_client()
        client.send_frame(b'{"type": "audio"}\n')
        client.send_raw(b'{"type": "close"}')
        self.assertEqual(transport.value(), b'{"type": "audio"}\n{"type": "close"}\n')
        self.assertRaises(ValueError, client.send_frame, b"\x00\x01", True)

    def test_handshake_failed(self):
        error = connection.HandshakeFailed(1006, None)
        self.assertIsInstance(error, ConnectionError)
        self.assertEqual((error.code, error.reason), (1006, None))
        self.assertEqual(str(error), "WebSocket handshake failed: 1006 None")
