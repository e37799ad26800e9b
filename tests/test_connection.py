"""
parakeet.connection.connection without a server: addresses and trust files.  (It is used
against real servers throughout the end-to-end, auth and TLS tests.)
"""

from twisted.internet import reactor
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
