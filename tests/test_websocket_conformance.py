"""
WebSocket conformance of the server's WebSocket port (RFC 6455), case group
by case group after the Autobahn TestSuite's fuzzing client.

The TestSuite itself (the ``autobahntestsuite`` package) is Python 2.7 code,
so it cannot be part of this Python 3 test run; docs/websocket-conformance.rst
tells how it was run by hand against the server, and holds its results and
this module's.  Here a raw client (:class:`RawClient`) does the HTTP
upgrade by hand and then writes frames exactly as each case needs them:
masked or not, any opcode, any RSV bits, lengths that lie, fragmented,
written in chops.  Every frame the server sends back is parsed and checked
(unmasked, RSV bits clear) on the way.

The server speaks the stream protocol, not echo: where the TestSuite expects
a text message echoed, these cases send ``{"type": "ping"}`` (padded with
spaces to the length under test) and expect ``{"type": "pong"}``; binary
messages are raw pcm16 audio, which an odd length makes the server refuse
with an ``error`` message naming the length it got.

The server runs with a fake model (:class:`tests.fakes.FakeEngine`): the
WebSocket transport never looks at the model, and the module stays fast.

The test classes are named after the TestSuite's case groups; each test's
docstring names the RFC 6455 section it checks.  Where the server's
behaviour departs from the RFC on purpose (invalid UTF-8 in a text message
gets an ``error`` message instead of close code 1007), the test asserts the
documented behaviour and says so.
"""

import base64
import collections
import hashlib
import json
import os
import struct

from twisted.internet import defer, endpoints, protocol, reactor, task
from twisted.trial import unittest

from parakeet.server import tap
from parakeet.server.transports import WEBSOCKET_HARD_LIMIT_FACTOR

from .support.fakes import FakeEngine
from .support.models import GEOMETRY
from .support.servers import wait_for

CONTINUATION, TEXT, BINARY, CLOSE, PING, PONG = 0, 1, 2, 8, 9, 10

#: RFC 6455 section 1.3: what the server hashes the client's key with.
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

PING_MESSAGE = b'{"type":"ping"}'


def padded_ping(length):
    """A ping message of exactly length bytes: JSON allows trailing spaces."""
    assert length >= len(PING_MESSAGE)
    return PING_MESSAGE + b" " * (length - len(PING_MESSAGE))


def close_payload(code=None, reason=b""):
    return b"" if code is None else struct.pack("!H", code) + reason


# Frames

def mask(key, payload):
    """payload XORed with the 4-byte key repeated (RFC 6455 section 5.3)."""
    if not payload:
        return b""
    size = len(payload)
    keys = (key * (size // 4 + 1))[:size]
    masked = int.from_bytes(payload, "big") ^ int.from_bytes(keys, "big")
    return masked.to_bytes(size, "big")


def frame(opcode, payload=b"", fin=True, rsv=0, masked=True, key=None):
    """The bytes of one frame, with the shortest length encoding."""
    size = len(payload)
    head = bytearray([(0x80 if fin else 0) | (rsv << 4) | opcode])
    bit = 0x80 if masked else 0
    if size < 126:
        head.append(bit | size)
    elif size < 1 << 16:
        head.append(bit | 126)
        head += struct.pack("!H", size)
    else:
        head.append(bit | 127)
        head += struct.pack("!Q", size)
    if not masked:
        return bytes(head) + payload
    key = os.urandom(4) if key is None else key
    return bytes(head) + key + mask(key, payload)


def fragmented(opcode, pieces):
    """The frames of one message in pieces: opcode, then continuations."""
    last = len(pieces) - 1
    return b"".join(frame(opcode if i == 0 else CONTINUATION, piece, fin=i == last)
                    for i, piece in enumerate(pieces))


def chop(data, size):
    return [data[i:i + size] for i in range(0, len(data), size)]


HALVES = [PING_MESSAGE[:5], PING_MESSAGE[5:]]


class Frame(collections.namedtuple("Frame", "fin rsv opcode masked payload")):
    """A frame the server sent."""

    @property
    def code(self):
        """A close frame's status code; None when its payload is empty."""
        return struct.unpack("!H", self.payload[:2])[0] if len(self.payload) >= 2 else None

    def json(self):
        return json.loads(self.payload.decode("utf-8"))


def parse_frame(data):
    """(Frame, bytes used) of the frame data starts with; None while incomplete."""
    if len(data) < 2:
        return None
    first, second = data[0], data[1]
    size, at = second & 0x7F, 2
    if size == 126:
        if len(data) < 4:
            return None
        size, at = struct.unpack("!H", data[2:4])[0], 4
    elif size == 127:
        if len(data) < 10:
            return None
        size, at = struct.unpack("!Q", data[2:10])[0], 10
    masked = bool(second & 0x80)
    key = b""
    if masked:
        key, at = data[at:at + 4], at + 4
    if len(data) < at + size:
        return None
    payload = data[at:at + size]
    if masked:
        payload = mask(key, payload)
    parsed = Frame(bool(first & 0x80), (first >> 4) & 7, first & 0x0F, masked, payload)
    return parsed, at + size


# The client

def upgrade_request(port, path="/", method="GET", http="HTTP/1.1", key=None,
                    omit=(), **fields):
    """An opening handshake (RFC 6455 section 4.1); fields add or replace
    header fields (underscores for dashes), omit leaves some out."""
    if key is None:
        key = base64.b64encode(os.urandom(16)).decode()
    headers = collections.OrderedDict([
        ("Host", "127.0.0.1:%d" % (port,)), ("Upgrade", "websocket"),
        ("Connection", "Upgrade"), ("Sec-WebSocket-Key", key),
        ("Sec-WebSocket-Version", "13")])
    for name, value in fields.items():
        headers[name.replace("_", "-")] = value
    lines = ["%s %s %s" % (method, path, http)]
    lines += ["%s: %s" % (name, value) for name, value in headers.items()
              if name not in omit]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def accept_for(key):
    """The Sec-WebSocket-Accept a server must answer key with (section 4.2.2)."""
    return base64.b64encode(hashlib.sha1(key.encode("ascii") + GUID).digest()).decode()


class RawClient(protocol.Protocol):
    """Writes an HTTP request, reads the response head, and after a 101 reads
    frames.  It answers the server's pings and replies to the server's close
    frame (echoing its code) as RFC 6455 section 5.5.1 asks, unless it sent a
    close frame itself; everything else is up to the test."""

    def __init__(self, request):
        self.request = request
        self.status = None
        self.headers = {}
        self.body = b""
        self.frames = []
        self.answered = defer.Deferred()   # fires once the response head is in
        self.closed = defer.Deferred()     # fires once the TCP connection is gone
        self.sent_close = False
        self.answer_close = True           # reply to the server's close frame
        self.hung_up = False               # this side closed the TCP connection
        self._buffer = b""
        self._read = 0
        self._waiter = None
        self._lost = False

    def connectionMade(self):
        self.transport.setTcpNoDelay(True)
        self.transport.write(self.request)

    @property
    def upgraded(self):
        return self.status == 101

    def header(self, name):
        """The one value of a response header field; None when absent."""
        values = self.headers.get(name.lower(), [])
        assert len(values) <= 1, (name, values)
        return values[0] if values else None

    def dataReceived(self, data):
        self._buffer += data
        if self.status is None:
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head, self._buffer = self._buffer[:end], self._buffer[end + 4:]
            lines = head.decode("latin-1").split("\r\n")
            self.status_line = lines[0]
            self.status = int(lines[0].split()[1])
            for line in lines[1:]:
                name, _, value = line.partition(":")
                self.headers.setdefault(name.strip().lower(), []).append(value.strip())
            self.answered.callback(self)
        if not self.upgraded:
            self.body += self._buffer
            self._buffer = b""
            return
        while True:
            parsed = parse_frame(self._buffer)
            if parsed is None:
                break
            received, used = parsed
            self._buffer = self._buffer[used:]
            self.frames.append(received)
            if received.opcode == CLOSE and not self.sent_close:
                if self.answer_close:
                    self.send_close(received.code)
            elif received.opcode == PING and not self.sent_close:
                self.send(PONG, received.payload)
        self._wake()

    def connectionLost(self, reason):
        self._lost = True
        if not self.answered.called:
            self.answered.errback(ConnectionError("no HTTP response: %s"
                                                  % (reason.getErrorMessage(),)))
        self._wake()
        self.closed.callback(None)

    # reading

    def _wake(self):
        if self._waiter is not None and (self._read < len(self.frames) or self._lost):
            waiter, self._waiter = self._waiter, None
            waiter.callback(self._next())

    def _next(self):
        if self._read < len(self.frames):
            self._read += 1
            return self.frames[self._read - 1]
        return None

    def next_frame(self):
        """A Deferred of the next frame not yet read; of None once the
        connection is gone and every frame was read."""
        assert self._waiter is None
        if self._read < len(self.frames) or self._lost:
            return defer.succeed(self._next())
        self._waiter = defer.Deferred()
        return self._waiter

    # writing

    def write(self, data):
        self.transport.write(data)

    def send(self, opcode, payload=b"", **options):
        self.write(frame(opcode, payload, **options))

    def send_close(self, code=None, reason=b""):
        self.sent_close = True
        self.send(CLOSE, close_payload(code, reason))

    @defer.inlineCallbacks
    def write_chopped(self, data, size):
        """data in writes of size bytes, each in its own reactor turn."""
        for start in range(0, len(data), size):
            self.transport.write(data[start:start + size])
            yield task.deferLater(reactor, 0, lambda: None)

    def hang_up(self):
        if not self._lost:
            self.hung_up = True
            self.transport.abortConnection()
        return self.closed


# Predicates on frames

def is_message(kind):
    """A text frame holding a JSON message of type kind."""
    def match(f):
        return f.opcode == TEXT and f.json().get("type") == kind
    match.__name__ = "a %r message" % (kind,)
    return match


def of_opcode(opcode):
    def match(f):
        return f.opcode == opcode
    match.__name__ = "a frame of opcode %d" % (opcode,)
    return match


def messages(frames, kind=None):
    """The JSON messages among frames, of type kind when given."""
    found = [f.json() for f in frames if f.opcode == TEXT]
    return [m for m in found if kind is None or m["type"] == kind]


def errors(frames):
    return [m["message"] for m in messages(frames, "error")]


# One test per case

def cases(*values):
    """Runs the test once per value: test_x becomes test_x_<value>, ..."""
    def mark(method):
        method.cases = values
        return method
    return mark


def expand_cases(cls):
    """Class decorator: one test method for each value of each @cases test."""
    for name, method in list(vars(cls).items()):
        values = getattr(method, "cases", None)
        if values is None:
            continue
        delattr(cls, name)
        for value in values:
            def test(self, method=method, value=value):
                return method(self, value)
            test.__name__ = "%s_%s" % (name, value)
            test.__doc__ = method.__doc__
            setattr(cls, test.__name__, test)
    return cls


class TransportEngine(FakeEngine):
    """The fake model, with what makeService and the decode loop ask of an engine."""

    model_name = "fake"
    device = "cpu"
    precision = "float32"
    sample_rate = GEOMETRY.sample_rate
    chunk_sizes_ms = (160,)
    languages = ()
    default_language = None

    def __init__(self):
        FakeEngine.__init__(self, GEOMETRY)

    def abort(self, stream_ids):
        pass


class ConformanceMixin:
    """A live server on loopback (fake model), and raw clients of its WebSocket port."""

    #: The server's options; None: each test starts its own server.
    server_flags = ()

    def setUp(self):
        if self.server_flags is not None:
            self.start_server(*self.server_flags)

    def start_server(self, *flags):
        options = tap.Options()
        options.parseOptions(["--host", "127.0.0.1", "--port", "0", "--ws-port", "0"]
                             + list(flags))
        self.server = tap.makeService(options, reactor, engine=TransportEngine())
        self.server.startService()
        self.addCleanup(self.stop_server)
        self.port = self.server.getServiceNamed("WebSocket clients").port.getHost().port

    @defer.inlineCallbacks
    def stop_server(self):
        yield wait_for(lambda: len(self.server.registry) == 0)
        yield self.server.stopService()

    @defer.inlineCallbacks
    def connect(self, request):
        """A RawClient that has written request and read the response head."""
        client = RawClient(request)
        endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", self.port)
        yield endpoints.connectProtocol(endpoint, client)
        self.addCleanup(client.hang_up)
        yield client.answered
        return client

    @defer.inlineCallbacks
    def http(self, request):
        """A RawClient once the server has answered request and closed the connection."""
        client = RawClient(request)
        endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", self.port)
        yield endpoints.connectProtocol(endpoint, client)
        self.addCleanup(client.hang_up)
        yield client.answered
        self.assertFalse(client.upgraded, "the server accepted the handshake")
        yield client.closed
        self.assertFalse(client.hung_up)
        return client

    @defer.inlineCallbacks
    def open(self, path="/"):
        """A RawClient past the handshake and the server's hello."""
        client = yield self.connect(upgrade_request(self.port, path))
        self.assertEqual(client.status, 101, client.status_line)
        hello = yield self.next_frame(client)
        self.assertTrue(is_message("hello")(hello), hello)
        return client

    @defer.inlineCallbacks
    def next_frame(self, client):
        received = yield client.next_frame()
        if received is not None:
            # Section 5.1: a server MUST NOT mask; 5.2: RSV bits MUST be 0
            # without an extension, and none is negotiated.
            self.assertFalse(received.masked, received)
            self.assertEqual(received.rsv, 0, received)
        return received

    @defer.inlineCallbacks
    def until(self, client, wanted):
        """The frames up to and including the first one wanted(frame) holds for."""
        seen = []
        while True:
            received = yield self.next_frame(client)
            if received is None:
                self.fail("the connection ended before %s came; got %r"
                          % (wanted.__name__, seen))
            seen.append(received)
            if wanted(received):
                return seen

    @defer.inlineCallbacks
    def rest(self, client):
        """Every frame until the server closes the TCP connection."""
        seen = []
        while True:
            received = yield self.next_frame(client)
            if received is None:
                self.assertFalse(client.hung_up)
                return seen
            seen.append(received)

    @defer.inlineCallbacks
    def assertAnswered(self, client, kind="pong"):
        """The server answers with a kind message, and with no error first."""
        frames = yield self.until(client, is_message(kind))
        self.assertEqual(errors(frames), [])
        return frames

    @defer.inlineCallbacks
    def assertFailed(self, client, code):
        """The server _Fails the WebSocket Connection_ (section 7.1.7): it MUST
        close the TCP connection, and SHOULD send a close frame with code
        (section 7.4.1) first, nothing after it (5.5.1).  The server means to
        send it (it runs Autobahn with failByDrop off for that), so it is
        asserted.  The frames before the close frame."""
        frames = yield self.rest(client)
        closes = [f for f in frames if f.opcode == CLOSE]
        if not closes:
            self.fail("the server closed the TCP connection without a close frame "
                      "(expected code %d); frames: %r" % (code, frames))
        self.assertEqual([f.code for f in closes], [code], frames)
        self.assertIs(frames[-1], closes[0])
        return frames[:-1]

    @defer.inlineCallbacks
    def assertClosedCleanly(self, client, codes):
        """The server answers the client's close frame with one of its own
        carrying one of codes (None: no code) and closes the TCP connection
        (sections 5.5.1, 7.1.1).  The frames before the close frame."""
        frames = yield self.rest(client)
        closes = [f for f in frames if f.opcode == CLOSE]
        self.assertEqual(len(closes), 1, frames)
        self.assertIn(closes[0].code, codes)
        self.assertIs(frames[-1], closes[0])
        return frames[:-1]


class HandshakeTests(ConformanceMixin, unittest.TestCase):
    """The opening handshake (RFC 6455 section 4)."""

    @defer.inlineCallbacks
    def test_accepted(self):
        """Section 4.2.2: 101, Upgrade, Connection and the Sec-WebSocket-Accept
        of the key; the offered extension and subprotocol are declined by
        leaving their header fields out (sections 4.2.2, 9.1)."""
        key = base64.b64encode(os.urandom(16)).decode()
        client = yield self.connect(upgrade_request(
            self.port, key=key, Sec_WebSocket_Extensions="permessage-deflate",
            Sec_WebSocket_Protocol="chat"))
        self.assertEqual(client.status, 101)
        self.assertEqual(client.header("Upgrade").lower(), "websocket")
        self.assertIn("upgrade", [v.strip().lower()
                                  for v in client.header("Connection").split(",")])
        self.assertEqual(client.header("Sec-WebSocket-Accept"), accept_for(key))
        self.assertIsNone(client.header("Sec-WebSocket-Extensions"))
        self.assertIsNone(client.header("Sec-WebSocket-Protocol"))
        yield self.assertAnswered(client, "hello")
        client.send(TEXT, PING_MESSAGE)
        yield self.assertAnswered(client)

    @defer.inlineCallbacks
    def test_unsupported_version(self):
        """Section 4.4 (and 4.2.2): a version the server does not speak (25, as
        in the RFC's example) gets an HTTP error code (the example's 400, or
        426) and a Sec-WebSocket-Version header field naming the versions it
        does, 13 among them."""
        client = yield self.http(upgrade_request(self.port, Sec_WebSocket_Version="25"))
        self.assertTrue(400 <= client.status < 500, client.status_line)
        versions = [v.strip() for v in client.header("Sec-WebSocket-Version").split(",")]
        self.assertIn("13", versions)

    @defer.inlineCallbacks
    def test_missing_key(self):
        """Section 4.2.1 item 5: no Sec-WebSocket-Key: 400 Bad Request."""
        client = yield self.http(upgrade_request(self.port, omit=("Sec-WebSocket-Key",)))
        self.assertEqual(client.status, 400)

    @defer.inlineCallbacks
    def test_key_not_16_bytes(self):
        """Section 4.2.1 item 5: a key that is not 16 bytes in base64: 400."""
        client = yield self.http(upgrade_request(
            self.port, key=base64.b64encode(b"too short").decode()))
        self.assertEqual(client.status, 400)

    @defer.inlineCallbacks
    def test_missing_host(self):
        """Section 4.2.1 item 2: no Host header field: 400."""
        client = yield self.http(upgrade_request(self.port, omit=("Host",)))
        self.assertEqual(client.status, 400)

    @defer.inlineCallbacks
    def test_not_get(self):
        """Section 4.2.1 item 1: the handshake is a GET; a POST gets an error
        code.  A 405 (Method Not Allowed) MUST carry an Allow header field
        (RFC 9110 section 15.5.6)."""
        client = yield self.http(upgrade_request(self.port, method="POST"))
        self.assertTrue(400 <= client.status < 600, client.status_line)
        if client.status == 405:
            # Autobahn sends no header fields; the server adds Allow.
            self.assertIn("GET", client.header("Allow") or "", client.headers)

    @defer.inlineCallbacks
    def test_http_1_0(self):
        """Section 4.2.1 item 1: HTTP/1.1 or higher; HTTP/1.0 gets an error code."""
        client = yield self.http(upgrade_request(self.port, http="HTTP/1.0"))
        self.assertTrue(400 <= client.status < 600, client.status_line)

    @defer.inlineCallbacks
    def test_plain_get(self):
        """Section 4.2.1 item 3: a GET without the Upgrade header field (a web
        browser visiting the port) is not a handshake: the server MUST answer
        with an error code (such as 400 Bad Request).  A 426 (Upgrade
        Required) MUST carry an Upgrade header field (RFC 9110 section 7.8)."""
        client = yield self.http(
            b"GET / HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % (self.port,))
        # Autobahn's webStatus option (on by default, off in this server)
        # would answer "200 OK" and an HTML page.
        self.assertTrue(400 <= client.status < 500, client.status_line)
        if client.status == 426:
            # Autobahn sends no header fields; the server adds Upgrade.
            self.assertEqual((client.header("Upgrade") or "").lower(), "websocket")

    @defer.inlineCallbacks
    def test_garbage(self):
        """Section 4.2.1: bytes that are no HTTP request get an error code; the
        server goes on serving."""
        client = yield self.http(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n")
        self.assertTrue(400 <= client.status < 500, client.status_line)
        client = yield self.open()
        client.send(TEXT, PING_MESSAGE)
        yield self.assertAnswered(client)

    @defer.inlineCallbacks
    def test_unknown_audio_encoding(self):
        """Section 4.2.2: a resource the server does not serve gets an HTTP
        error code; here the server's own check of its URL
        (``?encoding=mp3``) refuses with 400, and no stream is opened."""
        client = yield self.http(upgrade_request(self.port, path="/?encoding=mp3"))
        self.assertEqual(client.status, 400)
        self.assertEqual(len(self.server.registry), 0)


@expand_cases
class Group1FramingTests(ConformanceMixin, unittest.TestCase):
    """Case group 1: text and binary messages of the lengths at the edges of
    the three length encodings (RFC 6455 section 5.2)."""

    @cases(0, 125, 126, 127, 128, 65535, 65536)
    @defer.inlineCallbacks
    def test_text_length(self, length):
        """Sections 5.2, 5.6: a text message of this length arrives whole."""
        client = yield self.open()
        if length == 0:
            # An empty message is delivered too: the server says it is no JSON.
            client.send(TEXT, b"")
            frames = yield self.until(client, is_message("error"))
            self.assertIn("invalid JSON", errors(frames)[0])
        else:
            client.send(TEXT, padded_ping(length))
            yield self.assertAnswered(client)

    @defer.inlineCallbacks
    def test_text_65536_in_chops(self):
        """Sections 5.2, 5.6: a 65536-byte text message written in 997-byte chops."""
        client = yield self.open()
        yield client.write_chopped(frame(TEXT, padded_ping(65536)), 997)
        yield self.assertAnswered(client)

    @cases(0, 125, 126, 127, 128, 65535, 65536)
    @defer.inlineCallbacks
    def test_binary_length(self, length):
        """Sections 5.2, 5.6: a binary message of this length arrives whole:
        an odd length of pcm16 gets an error naming exactly that length."""
        client = yield self.open()
        client.send(BINARY, os.urandom(length))
        client.send(TEXT, PING_MESSAGE)
        frames = yield self.until(client, is_message("pong"))
        expected = [] if length % 2 == 0 else [
            "pcm16 audio must have an even number of bytes, got %d" % (length,)]
        self.assertEqual(errors(frames), expected)

    @defer.inlineCallbacks
    def test_binary_65536_in_chops(self):
        """Sections 5.2, 5.6: a 65536-byte binary message written in 997-byte chops."""
        client = yield self.open()
        yield client.write_chopped(frame(BINARY, os.urandom(65535)), 997)
        client.send(TEXT, PING_MESSAGE)
        frames = yield self.until(client, is_message("pong"))
        self.assertEqual(errors(frames),
                         ["pcm16 audio must have an even number of bytes, got 65535"])

    @defer.inlineCallbacks
    def test_server_frames(self):
        """Sections 5.1, 5.2: the server's frames are unmasked, final, with RSV
        bits clear; its messages are UTF-8 JSON text (checked for every frame
        by next_frame)."""
        client = yield self.open()
        client.send(TEXT, PING_MESSAGE)
        frames = yield self.assertAnswered(client)
        self.assertEqual([(f.fin, f.opcode) for f in frames], [(True, TEXT)])


@expand_cases
class Group2PingPongTests(ConformanceMixin, unittest.TestCase):
    """Case group 2: pings and pongs (RFC 6455 sections 5.5.2, 5.5.3)."""

    @cases("empty", "text", "binary", "125")
    @defer.inlineCallbacks
    def test_ping(self, kind):
        """Section 5.5.2: a ping is answered with a pong of the same payload."""
        payload = {"empty": b"", "text": b"Hello, world!", "binary": bytes(range(8)) * 2,
                   "125": os.urandom(125)}[kind]
        client = yield self.open()
        client.send(PING, payload)
        frames = yield self.until(client, of_opcode(PONG))
        self.assertEqual([(f.opcode, f.payload) for f in frames], [(PONG, payload)])

    @defer.inlineCallbacks
    def test_ping_126(self):
        """Section 5.5: control frames have at most 125 bytes of payload; a
        126-byte ping fails the connection (1002, section 7.4.1) unanswered."""
        client = yield self.open()
        client.send(PING, os.urandom(126))
        frames = yield self.assertFailed(client, 1002)
        self.assertEqual(frames, [])

    @defer.inlineCallbacks
    def test_ping_125_in_chops(self):
        """Section 5.5.2: a 125-byte ping written one byte at a time."""
        payload = os.urandom(125)
        client = yield self.open()
        yield client.write_chopped(frame(PING, payload), 1)
        frames = yield self.until(client, of_opcode(PONG))
        self.assertEqual([f.payload for f in frames], [payload])

    @cases("empty", "payload")
    @defer.inlineCallbacks
    def test_unsolicited_pong(self, kind):
        """Section 5.5.3: an unsolicited pong is ignored: no answer to it."""
        client = yield self.open()
        client.send(PONG, b"" if kind == "empty" else b"unsolicited")
        client.send(TEXT, PING_MESSAGE)
        frames = yield self.until(client, is_message("pong"))
        self.assertEqual(len(frames), 1, frames)

    @defer.inlineCallbacks
    def test_unsolicited_pong_then_ping(self):
        """Section 5.5.3: after an unsolicited pong, a ping gets its own pong."""
        client = yield self.open()
        client.send(PONG, b"unsolicited")
        client.send(PING, b"solicited")
        frames = yield self.until(client, of_opcode(PONG))
        self.assertEqual([(f.opcode, f.payload) for f in frames], [(PONG, b"solicited")])

    @cases("whole", "chops")
    @defer.inlineCallbacks
    def test_ten_pings(self, how):
        """Section 5.5.3: ten pings in a row: the pongs echo them in order, and
        the last one at least is answered (an endpoint MAY answer only the
        most recent ping of several not yet answered)."""
        client = yield self.open()
        payloads = [b"ping %d" % (i,) for i in range(10)]
        data = b"".join(frame(PING, p) for p in payloads)
        if how == "whole":
            client.write(data)
        else:
            yield client.write_chopped(data, 1)
        frames = yield self.until(client, lambda f: f.payload == payloads[-1])
        self.assertEqual({f.opcode for f in frames}, {PONG})
        answered = [f.payload for f in frames]
        self.assertEqual(answered, [p for p in payloads if p in answered])


@expand_cases
class Group3ReservedBitsTests(ConformanceMixin, unittest.TestCase):
    """Case group 3: RSV bits set with no extension negotiated (RFC 6455
    section 5.2): the server MUST fail the connection."""

    @defer.inlineCallbacks
    def test_rsv1_text(self):
        """Section 5.2: a text frame with RSV1: failed (1002), unanswered."""
        client = yield self.open()
        client.send(TEXT, PING_MESSAGE, rsv=1)
        frames = yield self.assertFailed(client, 1002)
        self.assertEqual(frames, [])

    @cases("whole", "frames", "octets")
    @defer.inlineCallbacks
    def test_after_a_valid_message(self, how):
        """Section 5.2: a valid message is answered; the next one with RSV2
        (written at once) or RSV2 and RSV3 (frame by frame, or byte by byte)
        fails the connection (1002), and a ping after it goes unanswered."""
        client = yield self.open()
        rsv = 2 if how == "whole" else 3
        frames = [frame(TEXT, PING_MESSAGE), frame(TEXT, PING_MESSAGE, rsv=rsv),
                  frame(PING, b"x")]
        if how == "whole":
            client.write(b"".join(frames))
        else:
            for data in frames:
                yield client.write_chopped(data, len(data) if how == "frames" else 1)
        before = yield self.assertFailed(client, 1002)
        self.assertEqual([f.opcode for f in before], [TEXT])
        self.assertEqual(messages(before), [{"type": "pong"}])

    @defer.inlineCallbacks
    def test_rsv4_binary(self):
        """Section 5.2: a binary frame with RSV1 (the compression bit, and no
        compression was negotiated): failed (1002)."""
        client = yield self.open()
        client.send(BINARY, os.urandom(8), rsv=4)
        frames = yield self.assertFailed(client, 1002)
        self.assertEqual(frames, [])

    @defer.inlineCallbacks
    def test_rsv5_ping(self):
        """Section 5.2: a ping with RSV1 and RSV3: failed (1002), no pong."""
        client = yield self.open()
        client.send(PING, b"x", rsv=5)
        frames = yield self.assertFailed(client, 1002)
        self.assertEqual(frames, [])

    @cases(6, 7)
    @defer.inlineCallbacks
    def test_close_with_rsv(self, rsv):
        """Section 5.2: a close frame with RSV bits: failed (1002)."""
        # Autobahn finds the violation while it handles a close frame: it
        # queues its own close frame and then aborts; the server closes
        # gracefully instead (StreamWebSocketProtocol._closeConnection).
        client = yield self.open()
        client.send(CLOSE, close_payload(1000), rsv=rsv)
        frames = yield self.assertFailed(client, 1002)
        self.assertEqual(frames, [])


@expand_cases
class Group4OpcodeTests(ConformanceMixin, unittest.TestCase):
    """Case group 4: reserved opcodes (RFC 6455 section 5.2): the server MUST
    fail the connection."""

    @defer.inlineCallbacks
    def fails_after_a_valid_message(self, opcode):
        client = yield self.open()
        client.write(frame(TEXT, PING_MESSAGE) + frame(opcode, b"reserved")
                     + frame(PING, b"x"))
        before = yield self.assertFailed(client, 1002)
        self.assertEqual([f.opcode for f in before], [TEXT])
        self.assertEqual(messages(before), [{"type": "pong"}])

    @cases(3, 4, 5, 6, 7)
    def test_reserved_data_opcode(self, opcode):
        """Section 5.2: a frame of a reserved non-control opcode after a valid
        message: the message is answered, then the connection fails (1002)
        and a ping after it goes unanswered."""
        return self.fails_after_a_valid_message(opcode)

    @cases(11, 12, 13, 14, 15)
    def test_reserved_control_opcode(self, opcode):
        """Section 5.2: a frame of a reserved control opcode after a valid
        message: answered, then failed (1002), the ping after it unanswered."""
        return self.fails_after_a_valid_message(opcode)


@expand_cases
class Group5FragmentationTests(ConformanceMixin, unittest.TestCase):
    """Case group 5: fragmented messages (RFC 6455 section 5.4)."""

    @cases(PING, PONG)
    @defer.inlineCallbacks
    def test_fragmented_control_frame(self, opcode):
        """Section 5.4: control frames MUST NOT be fragmented: a ping or pong
        in two fragments fails the connection (1002), unanswered."""
        client = yield self.open()
        client.write(frame(opcode, b"frag", fin=False) + frame(CONTINUATION, b"ment"))
        frames = yield self.assertFailed(client, 1002)
        self.assertEqual(frames, [])

    @cases("whole", "octets")
    @defer.inlineCallbacks
    def test_text_in_two_fragments(self, how):
        """Section 5.4: a text message in two fragments is one message; written
        at once or byte by byte."""
        client = yield self.open()
        data = fragmented(TEXT, HALVES)
        if how == "whole":
            client.write(data)
        else:
            yield client.write_chopped(data, 1)
        frames = yield self.assertAnswered(client)
        self.assertEqual(len(frames), 1)

    @cases("whole", "octets")
    @defer.inlineCallbacks
    def test_ping_between_fragments(self, how):
        """Section 5.4: control frames MAY be injected in the middle of a
        fragmented message: the ping is answered, then the message."""
        client = yield self.open()
        data = (frame(TEXT, HALVES[0], fin=False) + frame(PING, b"between")
                + frame(CONTINUATION, HALVES[1]))
        if how == "whole":
            client.write(data)
        else:
            yield client.write_chopped(data, 1)
        frames = yield self.assertAnswered(client)
        self.assertEqual([(f.opcode, f.payload) for f in frames],
                         [(PONG, b"between"), (TEXT, b'{"type":"pong"}')])

    @defer.inlineCallbacks
    def test_many_fragments_and_pings(self):
        """Section 5.4: five fragments with a ping after the second and the
        fourth: both pings answered, then the message."""
        client = yield self.open()
        frames = [frame(TEXT if i == 0 else CONTINUATION, part, fin=i == 4)
                  for i, part in enumerate(chop(PING_MESSAGE, 3))]
        frames.insert(4, frame(PING, b"ping 3"))
        frames.insert(2, frame(PING, b"ping 1"))
        client.write(b"".join(frames))
        frames = yield self.assertAnswered(client)
        self.assertEqual([(f.opcode, f.payload) for f in frames[:2]],
                         [(PONG, b"ping 1"), (PONG, b"ping 3")])
        self.assertEqual(len(frames), 3)

    @defer.inlineCallbacks
    def test_empty_fragments(self):
        """Section 5.4: fragments may be empty, the first and the last included."""
        client = yield self.open()
        client.write(fragmented(TEXT, [b"", PING_MESSAGE, b""]))
        yield self.assertAnswered(client)

    @defer.inlineCallbacks
    def test_binary_in_fragments(self):
        """Section 5.4: a binary message of 6 bytes in fragments of 3: whole,
        so even (each fragment alone would be refused as odd pcm16)."""
        client = yield self.open()
        client.write(fragmented(BINARY, [b"\x01\x02\x03", b"\x04\x05\x06"])
                     + frame(TEXT, PING_MESSAGE))
        yield self.assertAnswered(client)

    @cases("final", "not_final")
    @defer.inlineCallbacks
    def test_continuation_without_start(self, fin):
        """Section 5.4: a continuation frame with no message to continue fails
        the connection (1002); the valid message after it goes unanswered."""
        client = yield self.open()
        client.write(frame(CONTINUATION, b"nothing to continue", fin=fin == "final")
                     + frame(TEXT, PING_MESSAGE))
        frames = yield self.assertFailed(client, 1002)
        self.assertEqual(frames, [])

    @defer.inlineCallbacks
    def test_continuation_after_a_finished_message(self):
        """Section 5.4: a fragmented message, then a continuation frame with
        nothing left to continue: the message is answered, then the
        connection fails (1002)."""
        client = yield self.open()
        client.write(fragmented(TEXT, HALVES) + frame(CONTINUATION, b"nothing", fin=False)
                     + frame(TEXT, PING_MESSAGE))
        before = yield self.assertFailed(client, 1002)
        self.assertEqual(messages(before), [{"type": "pong"}])

    @cases(TEXT, BINARY)
    @defer.inlineCallbacks
    def test_new_message_inside_a_fragmented_one(self, opcode):
        """Section 5.4: the fragments of one message are not interleaved with
        another message: a text or binary frame while a text message is
        unfinished fails the connection (1002)."""
        client = yield self.open()
        client.write(frame(TEXT, HALVES[0], fin=False) + frame(opcode, HALVES[1]))
        frames = yield self.assertFailed(client, 1002)
        self.assertEqual(frames, [])


#: Valid UTF-8 beyond ASCII, at the edges of each sequence length.
VALID_TEXT = {
    "greek": "\u03ba\u1f79\u03c3\u03bc\u03b5",
    "two_bytes": "\u0080\u07ff",
    "three_bytes": "\u0800\ufffd\uffff",
    "four_bytes": "\U00010000\U0010ffff",
    "bom_and_noncharacters": "\ufeff\ufffe\U0001fffe",
}

#: Bytes that are not UTF-8 (RFC 3629): put inside a JSON string.
INVALID_UTF8 = {
    "lone_continuation": b"\x80",
    "overlong_slash": b"\xc0\xaf",
    "overlong_three_bytes": b"\xe0\x80\xaf",
    "surrogate": b"\xed\xa0\x80",
    "above_10ffff": b"\xf4\x90\x80\x80",
    "byte_fe": b"\xfe",
    "byte_ff": b"\xff",
    "truncated_sequence": b"\xce",
}


def ping_with(note):
    """A ping message carrying note (bytes) in a field the server ignores."""
    return b'{"type":"ping","note":"' + note + b'"}'


@expand_cases
class Group6UTF8Tests(ConformanceMixin, unittest.TestCase):
    """Case group 6: UTF-8 in text messages (RFC 6455 sections 5.6, 8.1).

    Invalid UTF-8 in a text message is where the server departs from the
    RFC on purpose: section 8.1 says to fail the connection (1007); the
    server instead answers with an ``error`` message, like any other
    malformed message, and the connection goes on (the Autobahn option
    utf8validateIncoming is off; README: "Errors are sent for invalid JSON
    or UTF-8 ... and the connection goes on").  Those tests assert the
    documented behaviour.
    """

    @cases(*sorted(VALID_TEXT))
    @defer.inlineCallbacks
    def test_valid(self, name):
        """Sections 5.6, 8.1: valid UTF-8 text (any code point, non-characters
        and U+FEFF included) is a valid message."""
        client = yield self.open()
        client.send(TEXT, ping_with(VALID_TEXT[name].encode("utf-8")))
        yield self.assertAnswered(client)

    @cases("code_points", "octets")
    @defer.inlineCallbacks
    def test_valid_fragmented(self, where):
        """Sections 5.4, 8.1: valid UTF-8 split into fragments inside its
        multi-byte sequences (or one frame per byte) is reassembled."""
        message = ping_with("".join(VALID_TEXT.values()).encode("utf-8"))
        if where == "octets":
            cuts = list(range(1, len(message)))
        else:
            # Inside the 2-, 3- and 4-byte sequences of "greek" and "four_bytes".
            start = message.index(b"\xce\xba")
            cuts = [start + 1, start + 3, message.index(b"\xf0\x90\x80\x80") + 2]
        pieces = [message[a:b] for a, b in zip([0] + cuts, cuts + [len(message)])]
        client = yield self.open()
        client.write(fragmented(TEXT, pieces))
        frames = yield self.assertAnswered(client)
        self.assertEqual(len(frames), 1)

    @cases(*sorted(INVALID_UTF8))
    @defer.inlineCallbacks
    def test_invalid(self, name):
        """Section 8.1 says fail (1007); deliberate deviation: the server
        answers with an ``error`` message and the connection goes on."""
        client = yield self.open()
        client.send(TEXT, ping_with(INVALID_UTF8[name]))
        client.send(TEXT, PING_MESSAGE)
        frames = yield self.until(client, is_message("pong"))
        self.assertEqual(errors(frames), ["message is not valid UTF-8"])
        self.assertNotIn(CLOSE, [f.opcode for f in frames])

    @cases("in_one_fragment", "across_fragments", "at_the_end")
    @defer.inlineCallbacks
    def test_invalid_fragmented(self, where):
        """Section 8.1 says fail (1007) for a fragmented message too;
        deliberate deviation: an ``error`` message, and the connection goes on."""
        first, second = {
            # valid first fragment, invalid bytes in the second
            "in_one_fragment": (b'{"type":"ping","note":"\xce\xba', b'\xed\xa0\x80"}'),
            # a sequence started in one fragment and broken in the next
            "across_fragments": (b'{"type":"ping","note":"\xe2\x82', b'A"}'),
            # the message ends inside a sequence
            "at_the_end": (b'{"type":"ping","note":""}', b"\xe2\x82"),
        }[where]
        client = yield self.open()
        client.write(fragmented(TEXT, [first, second]) + frame(TEXT, PING_MESSAGE))
        frames = yield self.until(client, is_message("pong"))
        self.assertEqual(errors(frames), ["message is not valid UTF-8"])


@expand_cases
class Group7CloseTests(ConformanceMixin, unittest.TestCase):
    """Case group 7: the closing handshake (RFC 6455 sections 5.5.1, 7)."""

    @defer.inlineCallbacks
    def test_message_then_close(self):
        """Sections 5.5.1, 7.1.1: a message is answered; a close frame gets a
        close frame back and the server closes the TCP connection."""
        client = yield self.open()
        client.send(TEXT, PING_MESSAGE)
        yield self.assertAnswered(client)
        client.send_close(1000)
        before = yield self.assertClosedCleanly(client, [1000])
        self.assertEqual(before, [])

    @defer.inlineCallbacks
    def test_close_twice(self):
        """Section 5.5.1: a second close frame after the first is ignored:
        one close frame back."""
        client = yield self.open()
        client.write(frame(CLOSE, close_payload(1000)) + frame(CLOSE, close_payload(1000)))
        client.sent_close = True
        before = yield self.assertClosedCleanly(client, [1000])
        self.assertEqual(before, [])

    @cases("ping", "message")
    @defer.inlineCallbacks
    def test_nothing_after_close(self, what):
        """Section 5.5.1: after the close frame the server sends nothing
        more: a ping or a message after the client's close goes unanswered."""
        client = yield self.open()
        client.send_close(1000)
        client.send(*((PING, b"late") if what == "ping" else (TEXT, PING_MESSAGE)))
        before = yield self.assertClosedCleanly(client, [1000])
        self.assertEqual(before, [])

    @defer.inlineCallbacks
    def test_close_inside_a_fragmented_message(self):
        """Sections 5.4, 5.5.1: a close frame between the fragments of a
        message closes the connection; the rest of the message is ignored."""
        client = yield self.open()
        client.write(frame(TEXT, HALVES[0], fin=False) + frame(CLOSE, close_payload(1000))
                     + frame(CONTINUATION, HALVES[1]))
        client.sent_close = True
        before = yield self.assertClosedCleanly(client, [1000])
        self.assertEqual(before, [])

    @defer.inlineCallbacks
    def test_close_right_after_a_bad_frame(self):
        """Section 7.1.7: a frame with RSV1 fails the connection (1002) even
        when the client's close frame follows in the same write; the server
        sends its close frame and processes nothing after the bad frame."""
        client = yield self.open()
        client.write(frame(TEXT, PING_MESSAGE, rsv=1) + frame(CLOSE, close_payload(1000)))
        client.sent_close = True
        # Autobahn reads both frames in one go: it queues its close frame for
        # the first, takes the second as the answer to it and aborts; the
        # server closes gracefully instead, so the frame arrives.
        frames = yield self.assertFailed(client, 1002)
        self.assertEqual(frames, [])

    @defer.inlineCallbacks
    def test_close_after_many_messages(self):
        """Sections 5.5.1, 7.1.1: ten 64 KiB messages and a close frame at
        once: the answers come first, then the close frame, nothing after."""
        client = yield self.open()
        client.write(frame(TEXT, padded_ping(65536)) * 10
                     + frame(CLOSE, close_payload(1000)))
        client.sent_close = True
        before = yield self.assertClosedCleanly(client, [1000])
        self.assertEqual(messages(before), [{"type": "pong"}] * 10)

    @defer.inlineCallbacks
    def test_close_without_payload(self):
        """Sections 5.5.1, 7.1.5: a close frame with no status code gets a
        close frame back (with no code, or 1000)."""
        client = yield self.open()
        client.send_close()
        yield self.assertClosedCleanly(client, [None, 1000])

    @defer.inlineCallbacks
    def test_close_payload_of_one_byte(self):
        """Section 5.5.1: a close body starts with a 2-byte status code; a
        1-byte body fails the connection (1002)."""
        # Autobahn finds the violation while it handles a close frame: it
        # queues its own close frame and then aborts; the server closes
        # gracefully instead (StreamWebSocketProtocol._closeConnection).
        client = yield self.open()
        client.write(frame(CLOSE, b"\x03"))
        yield self.assertFailed(client, 1002)

    @cases("no_reason", "reason", "reason_123_bytes")
    @defer.inlineCallbacks
    def test_close_1000(self, reason):
        """Sections 5.5, 5.5.1: a close frame with code 1000, with or without
        a reason (up to 123 bytes: 125 with the code), gets a close back."""
        client = yield self.open()
        client.send_close(1000, {"no_reason": b"", "reason": b"Hello World!",
                                 "reason_123_bytes": b"*" * 123}[reason])
        yield self.assertClosedCleanly(client, [1000])

    @defer.inlineCallbacks
    def test_close_reason_124_bytes(self):
        """Section 5.5: a close frame of 126 bytes (code and a 124-byte
        reason) is too long for a control frame: failed (1002)."""
        # Autobahn finds the violation while it handles a close frame: it
        # queues its own close frame and then aborts; the server closes
        # gracefully instead (StreamWebSocketProtocol._closeConnection).
        client = yield self.open()
        client.write(frame(CLOSE, close_payload(1000, b"*" * 124)))
        yield self.assertFailed(client, 1002)

    @defer.inlineCallbacks
    def test_close_reason_not_utf8(self):
        """Sections 5.5.1, 8.1: a close reason that is not UTF-8 fails the
        connection with 1007 (invalid payload data)."""
        # Autobahn finds the violation while it handles a close frame: it
        # queues its own close frame and then aborts; the server closes
        # gracefully instead (StreamWebSocketProtocol._closeConnection).
        client = yield self.open()
        client.write(frame(CLOSE, close_payload(1000, b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce"
                                                      b"\xbc\xce\xb5\xed\xa0\x80edited")))
        yield self.assertFailed(client, 1007)

    @cases(1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 3000, 3999, 4000, 4999)
    @defer.inlineCallbacks
    def test_valid_close_code(self, code):
        """Sections 7.4.1, 7.4.2: a close frame with a defined (or registered,
        or private-use) code gets a close frame back, echoing it or with 1000."""
        client = yield self.open()
        client.send_close(code)
        yield self.assertClosedCleanly(client, [code, 1000])

    @cases(0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535)
    @defer.inlineCallbacks
    def test_invalid_close_code(self, code):
        """Sections 7.4.1, 7.4.2: a close frame with a code that is not used
        (0-999), reserved (1004), never to be sent (1005, 1006, 1015),
        unassigned in 1000-2999, or beyond the defined ranges, fails the
        connection (1002)."""
        # Autobahn finds the violation while it handles a close frame: it
        # queues its own close frame and then aborts; the server closes
        # gracefully instead (StreamWebSocketProtocol._closeConnection).
        client = yield self.open()
        client.write(frame(CLOSE, close_payload(code)))
        yield self.assertFailed(client, 1002)


@expand_cases
class Group9LimitTests(ConformanceMixin, unittest.TestCase):
    """Case group 9 (limits): messages at and past the server's limits.

    The server refuses a message over ``--max-message-bytes`` with an
    ``error`` message (the protocol's own rule), and fails the connection
    with 1009 (RFC 6455 section 7.4.1: a message too big to process) once a
    frame or message is over four times that.
    """

    server_flags = None
    LIMIT = 1024
    HARD = LIMIT * WEBSOCKET_HARD_LIMIT_FACTOR

    def start_small(self):
        self.start_server("--max-message-bytes", str(self.LIMIT))

    @cases("limit", "hard_limit")
    @defer.inlineCallbacks
    def test_at(self, which):
        """Section 5.2: a message at the limit is answered; one at the hard
        limit is refused with an ``error`` message, and the connection goes on."""
        self.start_small()
        size = self.LIMIT if which == "limit" else self.HARD
        client = yield self.open()
        client.send(TEXT, padded_ping(size))
        client.send(TEXT, PING_MESSAGE)
        frames = yield self.until(client, is_message("pong"))
        self.assertEqual(errors(frames), [] if which == "limit" else [
            "message too large: the limit is 1024 bytes (got %d)" % (size,)])

    @defer.inlineCallbacks
    def test_over_the_limit(self):
        """The protocol's own limit: one byte over gets an ``error`` message
        and the connection goes on."""
        self.start_small()
        client = yield self.open()
        client.send(TEXT, padded_ping(self.LIMIT + 1))
        client.send(TEXT, PING_MESSAGE)
        frames = yield self.until(client, is_message("pong"))
        self.assertEqual(errors(frames),
                         ["message too large: the limit is 1024 bytes (got 1025)"])

    @cases(TEXT, BINARY)
    @defer.inlineCallbacks
    def test_frame_over_the_hard_limit(self, opcode):
        """Section 7.4.1: a frame one byte over the hard limit fails the
        connection with 1009, before any of it is answered."""
        self.start_small()
        client = yield self.open()
        client.send(opcode, padded_ping(self.HARD + 1))
        frames = yield self.assertFailed(client, 1009)
        self.assertEqual(frames, [])

    @defer.inlineCallbacks
    def test_message_over_the_hard_limit(self):
        """Section 7.4.1: a fragmented message whose frames are each within
        the limit, but not their sum, fails the connection with 1009."""
        self.start_small()
        client = yield self.open()
        client.write(fragmented(TEXT, chop(padded_ping(self.HARD + 1), 1000)))
        frames = yield self.assertFailed(client, 1009)
        self.assertEqual(frames, [])

    @cases("one_frame", "64k_fragments")
    @defer.inlineCallbacks
    def test_1_mib(self, how):
        """Sections 5.2, 5.4: with the default limit (1 MiB), a 1 MiB message in
        one frame (64-bit length) or in 64 KiB fragments is answered."""
        self.start_server()
        message = padded_ping(1 << 20)
        client = yield self.open()
        if how == "one_frame":
            client.send(TEXT, message)
        else:
            client.write(fragmented(TEXT, chop(message, 65536)))
        yield self.assertAnswered(client)


class Group10MiscTests(ConformanceMixin, unittest.TestCase):
    """Case group 10 (miscellaneous), and the client's masking."""

    @defer.inlineCallbacks
    def test_auto_fragmented(self):
        """Section 5.4: a 65536-byte message in 1300-byte fragments is answered."""
        client = yield self.open()
        client.write(fragmented(TEXT, chop(padded_ping(65536), 1300)))
        yield self.assertAnswered(client)

    @defer.inlineCallbacks
    def test_unmasked_frame(self):
        """Section 5.1: a server MUST close the connection on an unmasked
        client frame (and MAY say 1002 first): failed, unanswered."""
        client = yield self.open()
        client.send(TEXT, PING_MESSAGE, masked=False)
        frames = yield self.assertFailed(client, 1002)
        self.assertEqual(frames, [])

    @defer.inlineCallbacks
    def test_failed_without_the_clients_close(self):
        """Section 7.1.7: failing the connection, the server MUST close the
        TCP connection itself, whether or not the client answers its close
        frame (here it does not, and the server waits out its closing
        handshake timeout: the slowest test of the module)."""
        client = yield self.open()
        client.answer_close = False
        client.send(TEXT, PING_MESSAGE, rsv=1)
        frames = yield self.assertFailed(client, 1002)
        self.assertEqual(frames, [])

    @defer.inlineCallbacks
    def test_zero_masking_key(self):
        """Section 5.3: any 32-bit value is a masking key, zero included."""
        client = yield self.open()
        client.send(TEXT, PING_MESSAGE, key=b"\x00\x00\x00\x00")
        yield self.assertAnswered(client)
