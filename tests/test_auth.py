"""
Authentication and allowed origins: the token store and how clients present
tokens (no sockets), then the whole server over real loopback sockets with
real TCP and Autobahn clients.
"""

import base64
import json
import os
import signal
import threading

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import defer, endpoints, protocol, reactor
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python import usage
from twisted.trial import unittest

from parakeet.audio import encode_samples
from parakeet.clients import connection
from parakeet.server import auth, tap
from parakeet.server.auth import (
    AuthConfigError, Refusal, TokenReloader, TokenStore, auth_message_token,
    normalize_origin, origin_allowed, parse_origins, read_tokens, tcp_refusal,
    websocket_credential, websocket_refusal)

from .support.models import offline_tokens, quantized, speechlike
from .support.servers import PIECE, ServerTestMixin, wait_for

GOOD = "k7Hq2-ZbW_x9pLr4"
OTHER = "second-token.v2"
WRONG = "not-a-token-at-all"


def write(path, text):
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


class LogCapture:
    """Every log event while it is installed (see test's addCleanup)."""

    def __init__(self, test):
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        test.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def text(self):
        """Every event formatted, and every field's repr."""
        return "\n".join("%s %r" % (formatEvent(e), sorted(e.items(), key=repr))
                         for e in self.events)

    def formatted(self):
        return [formatEvent(e) for e in self.events if e.get("log_format")]


# The token store

class ReadTokensTests(unittest.TestCase):

    def test_one_per_line_comments_and_blank_lines(self):
        path = write(self.mktemp(), "\ufeff# the first client\n  %s  \n\n#%s\n\t%s\r\n   \n"
                     % (GOOD, WRONG, OTHER))
        self.assertEqual(read_tokens(path), [GOOD, OTHER])

    def test_missing_file(self):
        path = self.mktemp()
        with self.assertRaises(AuthConfigError) as e:
            read_tokens(path)
        self.assertIn("cannot read the token file %s" % (path,), str(e.exception))

    def test_no_tokens(self):
        path = write(self.mktemp(), "# nothing yet\n\n   \n")
        with self.assertRaises(AuthConfigError) as e:
            read_tokens(path)
        self.assertIn("the token file %s holds no token" % (path,), str(e.exception))

    def test_not_utf8(self):
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(b"\xff\xfe\x00token\n")
        with self.assertRaises(AuthConfigError) as e:
            read_tokens(path)
        self.assertIn("%s is not UTF-8" % (path,), str(e.exception))


class TokenStoreTests(unittest.TestCase):

    def store(self, text):
        self.path = write(self.mktemp(), text)
        return TokenStore(self.path)

    def test_check(self):
        store = self.store("%s\n%s\n" % (GOOD, OTHER))
        self.assertEqual(len(store), 2)
        self.assertTrue(store.check(GOOD))
        self.assertTrue(store.check(OTHER))
        self.assertTrue(store.check(GOOD.encode()))
        for token in (WRONG, GOOD[:-1], GOOD + "x", GOOD.upper(), "", None, " " + GOOD):
            self.assertFalse(store.check(token), token)

    def test_every_comparison_is_constant_time_and_none_stops_early(self):
        store = self.store("a\nb\nc\n")
        calls = []

        def spy(a, b):
            calls.append((a, b))
            return a == b

        self.patch(auth, "compare_digest", spy)
        self.assertTrue(store.check("a"))
        # All three tokens were compared although the first matched, and
        # what was compared were fixed-length digests, not the tokens.
        self.assertEqual(len(calls), 3)
        for a, b in calls:
            self.assertEqual((len(a), len(b)), (32, 32))
            self.assertNotIn(b"a", (a, b))
        del calls[:]
        self.assertFalse(store.check("d"))
        self.assertEqual(len(calls), 3)

    def test_reload(self):
        store = self.store("%s\n" % (GOOD,))
        write(self.path, "%s\n" % (OTHER,))
        self.assertTrue(store.reload())
        self.assertTrue(store.check(OTHER))
        self.assertFalse(store.check(GOOD))

    def test_failed_reload_keeps_the_tokens_and_says_why(self):
        store = self.store("%s\n%s\n" % (GOOD, OTHER))
        logs = LogCapture(self)
        write(self.path, "# all commented out: %s\n" % (WRONG,))
        self.assertFalse(store.reload())
        os.remove(self.path)
        self.assertFalse(store.reload())
        self.assertTrue(store.check(GOOD))
        self.assertTrue(store.check(OTHER))
        self.assertFalse(store.check(WRONG))
        errors = [formatEvent(e) for e in logs.events if e["log_level"].name == "error"]
        self.assertEqual(len(errors), 2)
        self.assertIn("keeping the 2 loaded before", errors[0])
        self.assertIn("holds no token", errors[0])
        self.assertIn("cannot read the token file", errors[1])
        self.assertNotIn(WRONG, logs.text())

    def test_logs_how_many_never_which(self):
        logs = LogCapture(self)
        store = self.store("%s\n%s\n" % (GOOD, OTHER))
        store.reload()
        self.assertEqual(["auth: 2 tokens loaded from %s" % (self.path,)] * 2,
                         [m for m in logs.formatted() if "loaded" in m])
        for token in (GOOD, OTHER):
            self.assertNotIn(token, logs.text())


class ReloaderTests(unittest.TestCase):

    def setUp(self):
        self.path = write(self.mktemp(), "%s\n" % (GOOD,))
        self.store = TokenStore(self.path)
        self.reloader = TokenReloader(self.store, reactor)

    def test_reload(self):
        write(self.path, "%s\n" % (OTHER,))
        self.reloader.reload()
        self.assertTrue(self.store.check(OTHER))

    @defer.inlineCallbacks
    def test_sighup(self):
        before = signal.getsignal(signal.SIGHUP)
        self.reloader.startService()
        self.addCleanup(lambda: self.reloader.running and self.reloader.stopService())
        self.assertIsNot(signal.getsignal(signal.SIGHUP), before)
        write(self.path, "%s\n" % (OTHER,))
        os.kill(os.getpid(), signal.SIGHUP)
        yield wait_for(lambda: self.store.check(OTHER), timeout=10)
        self.assertFalse(self.store.check(GOOD))
        self.reloader.stopService()
        self.assertIs(signal.getsignal(signal.SIGHUP), before)

    def test_no_handler_off_the_main_thread(self):
        before = signal.getsignal(signal.SIGHUP)
        thread = threading.Thread(target=self.reloader.startService)
        thread.start()
        thread.join()
        self.assertIs(signal.getsignal(signal.SIGHUP), before)
        self.reloader.stopService()
        self.assertIs(signal.getsignal(signal.SIGHUP), before)


# What clients present

class WebSocketCredentialTests(unittest.TestCase):

    def credential(self, headers=None, params=None, protocols=()):
        return websocket_credential(headers or {}, params or {}, list(protocols))

    def test_bearer_header(self):
        found = self.credential({"authorization": "Bearer  %s " % (GOOD,)})
        self.assertEqual((found.token, found.source), (GOOD.encode(), "the Authorization header"))
        found = self.credential({"authorization": "bearer %s" % (GOOD,)})
        self.assertEqual(found.token, GOOD.encode())

    def test_subprotocol(self):
        found = self.credential(protocols=["parakeet", "token." + GOOD])
        self.assertEqual((found.token, found.source), (GOOD.encode(), "the subprotocol"))

    def test_query(self):
        found = self.credential(params={"token": [GOOD]})
        self.assertEqual((found.token, found.source), (GOOD, "the token query parameter"))

    def test_precedence(self):
        both = self.credential({"authorization": "Bearer " + GOOD}, {"token": [WRONG]},
                               ["parakeet", "token." + OTHER])
        self.assertEqual(both.token, GOOD.encode())
        self.assertEqual(self.credential({}, {"token": [WRONG]},
                                         ["parakeet", "token." + OTHER]).token,
                         OTHER.encode())

    def test_missing(self):
        for found in (self.credential(), self.credential(protocols=["parakeet"]),
                      self.credential({"authorization": "Bearer "}, {"token": [""]},
                                      ["parakeet", "token."])):
            self.assertIsInstance(found, Refusal)
            self.assertEqual(found.reason, "missing token")
            self.assertIn("authentication required: missing token", found.message)
            for way in ("Authorization: Bearer TOKEN", "'parakeet'", "'token.TOKEN'",
                        "?token=TOKEN"):
                self.assertIn(way, found.message)

    def test_other_authorization_scheme(self):
        found = self.credential({"authorization": "Basic dXNlcjpwdw=="})
        self.assertEqual(found, Refusal("authentication required: the Authorization "
                                        "header must be 'Bearer TOKEN'", "missing token"))
        # Another form still counts.
        self.assertEqual(self.credential({"authorization": "Basic dXNlcjpwdw=="},
                                         {"token": [GOOD]}).token, GOOD)

    def test_refusal(self):
        store = TokenStore(write(self.mktemp(), GOOD + "\n"))
        self.assertIsNone(websocket_refusal(store, {"authorization": "Bearer " + GOOD}, {}, []))
        wrong = websocket_refusal(store, {}, {"token": [WRONG]}, [])
        self.assertEqual(wrong, Refusal("authentication failed: wrong token (from the "
                                        "token query parameter)", "wrong token"))
        self.assertNotIn(WRONG, repr(wrong))


class TCPAuthMessageTests(unittest.TestCase):

    def test_token(self):
        self.assertEqual(auth_message_token(b'{"type": "auth", "token": "%s"}'
                                            % (GOOD.encode(),)), GOOD)

    def test_not_an_auth_message(self):
        for line in (b"{not json", b"[1]", b'{"type": "ping"}', b'{"token": "x"}',
                     b'{"type": "audio", "data": ""}', b"\xff"):
            refusal = auth_message_token(line)
            self.assertEqual(refusal.reason, "no auth message", line)
            self.assertEqual(refusal.message, 'authentication required: the first message '
                                              'must be {"type": "auth", "token": "..."}')

    def test_no_token(self):
        for line in (b'{"type": "auth"}', b'{"type": "auth", "token": ""}',
                     b'{"type": "auth", "token": 7}'):
            refusal = auth_message_token(line)
            self.assertEqual(refusal.reason, "missing token", line)
            self.assertIn("the auth message has no token", refusal.message)

    def test_refusal(self):
        store = TokenStore(write(self.mktemp(), GOOD + "\n"))
        self.assertIsNone(tcp_refusal(store, json.dumps({"type": "auth", "token": GOOD})))
        self.assertEqual(tcp_refusal(store, json.dumps({"type": "auth", "token": WRONG})),
                         Refusal("authentication failed: wrong token", "wrong token"))


class OriginTests(unittest.TestCase):

    def test_normalize(self):
        for given, expected in [
                ("https://App.Example.com", "https://app.example.com"),
                ("https://app.example.com:443/", "https://app.example.com"),
                ("http://localhost:8080", "http://localhost:8080"),
                ("http://localhost:80", "http://localhost"),
                ("http://[::1]:3000", "http://[::1]:3000"),
                ("null", "null")]:
            self.assertEqual(normalize_origin(given), expected)
        for bad in ("app.example.com", "https://", "https://a.example/page",
                    "https://a.example:99999", "https://a.example?x=1"):
            self.assertRaises(ValueError, normalize_origin, bad)

    def test_parse(self):
        self.assertEqual(parse_origins(" https://app.example.com, http://localhost:8080,"),
                         {"https://app.example.com", "http://localhost:8080"})
        self.assertRaises(ValueError, parse_origins, " , ")
        self.assertRaises(ValueError, parse_origins, "https://a.example,a.example")

    def test_allowed(self):
        allowed = parse_origins("https://app.example.com,http://localhost:8080")
        self.assertTrue(origin_allowed(allowed, "https://app.example.com"))
        self.assertTrue(origin_allowed(allowed, "https://APP.example.com:443"))
        self.assertTrue(origin_allowed(allowed, "http://localhost:8080"))
        self.assertTrue(origin_allowed(allowed, ""))     # not from a browser
        self.assertTrue(origin_allowed(allowed, None))
        self.assertTrue(origin_allowed(None, "https://evil.example"))
        for origin in ("https://evil.example", "http://app.example.com",
                       "http://localhost:8081", "null", "garbage"):
            self.assertFalse(origin_allowed(allowed, origin), origin)


class OptionsTests(unittest.TestCase):

    def parse(self, *flags):
        options = tap.Options()
        options.parseOptions(list(flags))
        return options

    def test_off_by_default(self):
        options = self.parse()
        self.assertIsNone(options["auth-tokens"])
        self.assertIsNone(options["allowed-origins"])

    def test_token_file(self):
        path = write(self.mktemp(), GOOD + "\n")
        self.assertEqual(self.parse("--auth-tokens", path)["auth-tokens"], path)

    def test_unusable_token_file(self):
        missing = self.mktemp()
        empty = write(self.mktemp(), "# none\n")
        for path, why in ((missing, "cannot read"), (empty, "holds no token")):
            with self.assertRaises(usage.UsageError) as e:
                self.parse("--auth-tokens", path)
            self.assertIn("--auth-tokens", str(e.exception))
            self.assertIn(path, str(e.exception))
            self.assertIn(why, str(e.exception))

    def test_service_tree(self):
        from .support.models import shared_tiny_engine

        path = write(self.mktemp(), GOOD + "\n")
        options = self.parse("--port", "0", "--ws-port", "0", "--host", "127.0.0.1",
                             "--auth-tokens", path, "--allowed-origins", "http://a.example")
        top = tap.makeService(options, reactor, engine=shared_tiny_engine())
        reloader = top.getServiceNamed("auth tokens")
        self.assertIsInstance(reloader, TokenReloader)
        factories = [top.getServiceNamed(name).factory
                     for name in ("TCP clients", "WebSocket clients")]
        self.assertEqual([f.auth for f in factories], [reloader.store] * 2)
        self.assertEqual(factories[1].allowed_origins, {"http://a.example"})

    def test_origins(self):
        options = self.parse("--allowed-origins", "https://app.example.com,http://localhost:8080")
        self.assertEqual(options["allowed-origins"],
                         "https://app.example.com,http://localhost:8080")
        with self.assertRaises(usage.UsageError) as e:
            self.parse("--allowed-origins", "app.example.com")
        self.assertIn("--allowed-origins", str(e.exception))


# The whole server

class _OriginClient(WebSocketClientProtocol):
    """A WebSocket client that only tells whether its handshake succeeded
    (and is then dropped)."""

    def onOpen(self):
        self.factory.opened.callback(self)

    def onClose(self, wasClean, code, reason):
        if not self.factory.opened.called:
            self.factory.opened.errback(ConnectionError(self.wasNotCleanReason or reason))


class AuthServerTests(ServerTestMixin, unittest.TestCase):

    def setUp(self):
        self.tokens = write(self.mktemp(), "# clients\n%s\n%s\n" % (GOOD, OTHER))
        self.logs = LogCapture(self)

    def tearDown(self):
        text = self.logs.text()
        for token in (GOOD, OTHER, WRONG):
            self.assertNotIn(token, text)

    def start(self, *flags):
        return self.start_server("--auth-tokens", self.tokens, *flags)

    def tcp(self):
        return "tcp://127.0.0.1:%d" % (self.ports["TCP clients"],)

    def ws(self, query=""):
        return "ws://127.0.0.1:%d/%s" % (self.ports["WebSocket clients"], query)

    @defer.inlineCallbacks
    def open(self, address, token=None, **kwargs):
        if kwargs:
            client = yield connection.connect_websocket(reactor, address, token=token, **kwargs)
        else:
            client = yield connection.connect(reactor, address, token=token)
        self.addCleanup(self._hang_up, client)
        return client

    @defer.inlineCallbacks
    def transcribes(self, client, seed, seconds=1.0):
        audio = speechlike(seed, seconds)
        final = yield self.stream(client, audio)
        expected, _ = offline_tokens(self.engine, quantized(audio))
        self.assertEqual(self.assertResultsConsistent(client), expected)
        self.assertEqual(client.errors(), [])
        return final

    @defer.inlineCallbacks
    def refused(self, client, fragment):
        """client was told fragment and closed, and no stream was opened."""
        error = yield client.next(lambda m: m["type"] == "error")
        self.assertIn(fragment, error["message"])
        yield client.closed
        self.assertEqual([m["type"] for m in client.messages], ["error"])
        self.assertEqual(len(self.server.registry), 0)
        return error

    # TCP

    @defer.inlineCallbacks
    def test_tcp_token(self):
        self.start()
        client = yield self.open(self.tcp(), token=GOOD)
        hello = yield client.next()
        self.assertEqual(hello["type"], "hello")
        yield self.transcribes(client, 60)

    @defer.inlineCallbacks
    def test_tcp_auth_and_audio_in_one_write(self):
        # A client need not wait for hello: the lines after its auth line,
        # even in the same packet, are its stream.
        self.start()
        client = yield self.open(self.tcp())
        audio = speechlike(61, 0.5)
        lines = [{"type": "auth", "token": OTHER}]
        for start in range(0, len(audio), PIECE):
            data = encode_samples(audio[start:start + PIECE], "pcm16")
            lines.append({"type": "audio", "data": base64.b64encode(data).decode(),
                          "final": start + PIECE >= len(audio)})
        client._proto.transport.write(b"".join(json.dumps(m).encode() + b"\n" for m in lines))
        yield client.final()
        self.assertEqual(client.messages[0]["type"], "hello")
        expected, _ = offline_tokens(self.engine, quantized(audio))
        self.assertEqual(self.assertResultsConsistent(client), expected)

    @defer.inlineCallbacks
    def test_tcp_wrong_token(self):
        self.start()
        client = yield self.open(self.tcp(), token=WRONG)
        error = yield self.refused(client, "authentication failed: wrong token")
        self.assertEqual(error, {"type": "error",
                                 "message": "authentication failed: wrong token"})

    @defer.inlineCallbacks
    def test_tcp_auth_message_without_token(self):
        self.start()
        client = yield self.open(self.tcp())
        client.send({"type": "auth"})
        yield self.refused(client, "authentication failed: the auth message has no token")

    @defer.inlineCallbacks
    def test_tcp_other_first_message(self):
        self.start()
        client = yield self.open(self.tcp())
        client.send({"type": "ping"})
        client.send({"type": "auth", "token": GOOD})  # too late
        yield self.refused(client, 'the first message must be {"type": "auth"')

    @defer.inlineCallbacks
    def test_tcp_silence(self):
        self.start("--idle-timeout", "0.3")
        client = yield self.open(self.tcp())
        yield self.refused(client, "authentication required: no auth message within 0.3 s")

    @defer.inlineCallbacks
    def test_tcp_long_first_line(self):
        self.start()
        client = yield self.open(self.tcp())
        client.send_raw(b"x" * 100000)
        yield self.refused(client, "the first message must be an auth message of at most")

    # WebSocket

    @defer.inlineCallbacks
    def test_websocket_header(self):
        self.start()
        client = yield self.open(self.ws(), token=GOOD)
        yield self.transcribes(client, 62)

    @defer.inlineCallbacks
    def test_websocket_query(self):
        self.start()
        client = yield self.open(self.ws("?token=" + OTHER))
        yield self.transcribes(client, 63)

    @defer.inlineCallbacks
    def test_websocket_subprotocol(self):
        self.start()
        client = yield self.open(self.ws(), protocols=["parakeet", "token." + GOOD])
        # The server selected parakeet, never the token.
        self.assertEqual(client._proto.websocket_protocol_in_use, "parakeet")
        yield self.transcribes(client, 64)

    @defer.inlineCallbacks
    def test_websocket_token_subprotocol_alone_is_refused(self):
        self.start()
        with self.assertRaises(ConnectionError) as caught:
            yield self.open(self.ws(), protocols=["token." + GOOD])
        self.assertIn("400", str(caught.exception))
        self.assertEqual(len(self.server.registry), 0)

    @defer.inlineCallbacks
    def test_websocket_wrong_token(self):
        self.start()
        for how in ({"token": WRONG}, {"protocols": ["parakeet", "token." + WRONG]}):
            client = yield self.open(self.ws(), **how)
            yield self.refused(client, "authentication failed: wrong token")
            self.assertEqual((client.close_code, client.close_reason), (1008, "wrong token"))
        client = yield self.open(self.ws("?token=" + WRONG))
        yield self.refused(client, "authentication failed: wrong token (from the token "
                                   "query parameter)")

    @defer.inlineCallbacks
    def test_websocket_missing_token(self):
        self.start()
        for how in ({}, {"protocols": ["parakeet"]}):
            client = yield self.open(self.ws(), **how)
            yield self.refused(client, "authentication required: missing token")
            self.assertEqual((client.close_code, client.close_reason), (1008, "missing token"))

    @defer.inlineCallbacks
    def test_registry_full_still_refuses_after_auth(self):
        self.start("--max-num-streams", "1")
        first = yield self.open(self.tcp(), token=GOOD)
        yield first.next()
        second = yield self.open(self.ws(), token=GOOD)
        yield second.next()
        self.assertEqual(second.errors(), ["No free streaming state available."])
        yield second.closed

    # Reloading

    @defer.inlineCallbacks
    def test_sighup_reloads_and_open_streams_go_on(self):
        self.start()
        reloader = self.server.getServiceNamed("auth tokens")
        audio = speechlike(65, 1.5)
        open_stream = yield self.open(self.ws(), token=GOOD)
        yield open_stream.next(lambda m: m["type"] == "hello")
        half = len(audio) // 2
        for start in range(0, half, PIECE):
            open_stream.send_audio(audio[start:min(start + PIECE, half)])
        added = "added-later-77"
        write(self.tokens, "%s\n%s\n" % (OTHER, added))
        if reloader._installed:
            os.kill(os.getpid(), signal.SIGHUP)
        else:  # not on the main thread: no handler was installed
            reloader.reload()
        yield wait_for(lambda: reloader.store.check(added), timeout=10)
        # A removed token no longer works; an added one does.
        refused = yield self.open(self.tcp(), token=GOOD)
        yield self.refused_while_one_is_open(refused, "wrong token")
        welcome = yield self.open(self.tcp(), token=added)
        self.assertEqual((yield welcome.next())["type"], "hello")
        welcome.close()
        yield welcome.final()
        # The stream opened with the removed token finishes as usual.
        for start in range(half, len(audio), PIECE):
            open_stream.send_audio(audio[start:start + PIECE],
                                   final=start + PIECE >= len(audio))
        final = yield open_stream.final()
        self.assertTrue(final["is_final"])
        expected, _ = offline_tokens(self.engine, quantized(audio))
        self.assertEqual(self.assertResultsConsistent(open_stream), expected)
        self.assertEqual(open_stream.errors(), [])
        self.assertNotIn(added, self.logs.text())

    @defer.inlineCallbacks
    def refused_while_one_is_open(self, client, fragment):
        error = yield client.next(lambda m: m["type"] == "error")
        self.assertIn(fragment, error["message"])
        yield client.closed
        self.assertEqual(len(client.messages), 1)

    @defer.inlineCallbacks
    def test_failed_reload_keeps_serving(self):
        self.start()
        reloader = self.server.getServiceNamed("auth tokens")
        os.remove(self.tokens)
        self.assertFalse(reloader.reload())
        client = yield self.open(self.tcp(), token=GOOD)
        self.assertEqual((yield client.next())["type"], "hello")
        client.close()
        yield client.final()

    # Origins

    @defer.inlineCallbacks
    def handshake(self, origin=None):
        factory = WebSocketClientFactory(self.ws(), origin=origin)
        factory.protocol = _OriginClient
        factory.opened = defer.Deferred()
        endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1",
                                                self.ports["WebSocket clients"])
        yield endpoint.connect(factory)
        proto = yield factory.opened
        proto.transport.abortConnection()
        return proto

    @defer.inlineCallbacks
    def test_allowed_origins(self):
        self.start_server("--allowed-origins", "https://app.example.com,http://localhost:8080")
        for origin in ("https://app.example.com", "http://localhost:8080", None):
            yield self.handshake(origin)
        for origin in ("https://evil.example", "http://localhost:8081", "null"):
            with self.assertRaises(ConnectionError) as caught:
                yield self.handshake(origin)
            self.assertIn("origin not allowed", str(caught.exception))
        yield wait_for(lambda: len(self.server.registry) == 0)

    @defer.inlineCallbacks
    def test_any_origin_by_default(self):
        self.start_server()
        for origin in ("https://evil.example", "null"):
            yield self.handshake(origin)
        yield wait_for(lambda: len(self.server.registry) == 0)

    @defer.inlineCallbacks
    def test_disallowed_origin_gets_403(self):
        self.start_server("--allowed-origins", "https://app.example.com")
        status = yield raw_handshake(self.ports["WebSocket clients"], "https://evil.example")
        self.assertTrue(status.startswith(b"HTTP/1.1 403 "), status)
        status = yield raw_handshake(self.ports["WebSocket clients"], "https://app.example.com")
        self.assertTrue(status.startswith(b"HTTP/1.1 101 "), status)

    @defer.inlineCallbacks
    def test_origins_and_tokens_together(self):
        self.start("--allowed-origins", "https://app.example.com")
        client = yield self.open(self.ws(), token=GOOD,
                                 headers={"Origin": "https://app.example.com"})
        self.assertEqual((yield client.next())["type"], "hello")
        with self.assertRaises(ConnectionError) as caught:
            yield self.open(self.ws(), token=GOOD, headers={"Origin": "https://evil.example"})
        self.assertIn("403", str(caught.exception))


class HTTPPortTests(ServerTestMixin, unittest.TestCase):
    """The same checks on the stream WebSocket under /ws of the HTTP port."""

    def setUp(self):
        self.tokens = write(self.mktemp(), "%s\n" % (GOOD,))
        self.logs = LogCapture(self)

    def tearDown(self):
        self.assertNotIn(GOOD, self.logs.text())
        self.assertNotIn(WRONG, self.logs.text())

    def url(self, query=""):
        port = self.server.getServiceNamed("HTTP").port.getHost().port
        return "ws://127.0.0.1:%d/ws%s" % (port, query)

    @defer.inlineCallbacks
    def test_tokens_and_origins(self):
        self.start_server("--http-port", "0", "--auth-tokens", self.tokens,
                          "--allowed-origins", "https://app.example.com")
        for how in ({"token": GOOD}, {"protocols": ["parakeet", "token." + GOOD]}):
            client = yield connection.connect_websocket(reactor, self.url(), **how)
            self.addCleanup(self._hang_up, client)
            self.assertEqual((yield client.next())["type"], "hello")
            client.close()
            yield client.closed
        client = yield connection.connect_websocket(reactor, self.url("?token=" + GOOD))
        self.assertEqual((yield client.next())["type"], "hello")
        client.close()
        yield client.closed
        client = yield connection.connect_websocket(reactor, self.url("?token=" + WRONG))
        error = yield client.next()
        self.assertIn("wrong token", error["message"])
        yield client.closed
        self.assertEqual(client.close_code, 1008)
        with self.assertRaises(ConnectionError) as caught:
            yield connection.connect_websocket(reactor, self.url(), token=GOOD,
                                            headers={"Origin": "https://evil.example"})
        self.assertIn("403", str(caught.exception))
        yield wait_for(lambda: len(self.server.registry) == 0)


class AuthOffTests(ServerTestMixin, unittest.TestCase):
    """Without --auth-tokens a client with a token works all the same."""

    @defer.inlineCallbacks
    def test_token_ignored(self):
        self.start_server()
        for address in ("tcp://127.0.0.1:%d" % (self.ports["TCP clients"],),
                        "ws://127.0.0.1:%d" % (self.ports["WebSocket clients"],)):
            client = yield connection.connect(reactor, address, token=GOOD)
            self.addCleanup(self._hang_up, client)
            audio = speechlike(66, 0.5)
            yield self.stream(client, audio)
            self.assertEqual(client.errors(), [])

    @defer.inlineCallbacks
    def test_parakeet_subprotocol_selected(self):
        self.start_server()
        client = yield connection.connect_websocket(
            reactor, "ws://127.0.0.1:%d" % (self.ports["WebSocket clients"],),
            protocols=["parakeet", "token." + GOOD])
        self.addCleanup(self._hang_up, client)
        self.assertEqual(client._proto.websocket_protocol_in_use, "parakeet")
        self.assertEqual((yield client.next())["type"], "hello")


def raw_handshake(port, origin):
    """The status line the server answers a WebSocket handshake from origin with."""
    done = defer.Deferred()

    class Handshake(protocol.Protocol):
        data = b""

        def connectionMade(self):
            self.transport.write(
                b"GET / HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                b"Sec-WebSocket-Version: 13\r\nOrigin: %s\r\n\r\n" % (port, origin.encode()))

        def dataReceived(self, data):
            self.data += data
            if b"\r\n" in self.data and not done.called:
                done.callback(self.data.split(b"\r\n")[0])
                self.transport.abortConnection()

        def connectionLost(self, reason):
            if not done.called:
                done.callback(self.data)

    endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    endpoints.connectProtocol(endpoint, Handshake())
    return done
