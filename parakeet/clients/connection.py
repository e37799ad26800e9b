"""
A Twisted client for the server, over TCP or WebSocket, in the clear or TLS.

    client = yield connect(reactor, "wss://speech.example.com:8000", token=TOKEN)
    hello = yield client.next(lambda m: m["type"] == "hello")
    client.send_audio(samples, final=True)
    final = yield client.final()

Every message the server sends is kept in ``client.messages``, in order
(unless the client is made with ``keep_messages=False``, for long runs:
``on_message`` then sees each one as it comes).  Messages already encoded
for the wire go out with ``send_frame``, as the bench sends them.
"""

import base64
import json
from urllib.parse import urlsplit

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import defer, endpoints, protocol
from twisted.protocols.basic import LineReceiver

from ..audio import encode_samples
from ..sockets import send_at_once, skip_debug_formatting


class HandshakeFailed(ConnectionError):
    """The WebSocket opening handshake did not complete: code and reason
    are the close code and reason the connection ended with."""

    def __init__(self, code, reason):
        super().__init__("WebSocket handshake failed: %s %s" % (code, reason))
        self.code = code
        self.reason = reason


class StreamClient:
    """One connection to the server, whichever the transport.

    keep_messages: keep every message the server sends in ``messages``
    (which results() and errors() read); without, messages stays empty,
    next() and final() see only messages yet to come, and on_message each
    one as it comes.
    """

    def __init__(self, keep_messages=True):
        self.messages = []
        self.keep_messages = keep_messages
        self.closed = defer.Deferred()
        self._waiters = []
        self._proto = None
        #: Called with every message as it arrives, when set.
        self.on_message = None
        #: Called with the bytes of a message that is not a JSON object,
        #: when set, instead of keeping it; if not, a message that is not
        #: JSON fails the connection.
        self.on_unreadable = None
        #: Over WebSocket, once the connection is closed: the close code and
        #: reason the server sent (None if it sent none).
        self.close_code = self.close_reason = None

    @property
    def transport(self):
        """The connection's transport (to register a producer with, say)."""
        return self._proto.transport

    # sending

    def send(self, message):
        """Send a message dict as JSON."""
        self.send_raw(json.dumps(message).encode("utf-8"))

    def send_raw(self, data):
        """Send bytes as one message (a line or a WebSocket text message)."""
        self._proto.send_message(data)

    def send_frame(self, data, binary=False):
        """Send bytes already framed for the transport: over TCP, written as
        they are (JSON lines, each ending with its newline); over WebSocket,
        one message, binary or text."""
        self._proto.send_frame(data, binary)

    def send_audio(self, samples, final=False, encoding="pcm16"):
        data = base64.b64encode(encode_samples(samples, encoding)).decode("ascii")
        self.send({"type": "audio", "data": data, "encoding": encoding, "final": final})

    def close(self):
        """Ask the server to finalize the stream."""
        self.send({"type": "close"})

    def disconnect(self):
        """Drop the connection without finalizing."""
        self._proto.drop()

    # receiving

    def next(self, predicate=lambda message: True):
        """A Deferred firing with the first message, received or to come, matching predicate.

        It fails with ConnectionDone if the connection ends first.
        """
        for message in self.messages:
            if predicate(message):
                return defer.succeed(message)
        d = defer.Deferred()
        if self.closed.called:
            d.errback(protocol.connectionDone)
        else:
            self._waiters.append((predicate, d))
        return d

    def final(self):
        return self.next(lambda m: m.get("type") == "result" and m.get("is_final"))

    def results(self):
        return [m for m in self.messages if m.get("type") == "result"]

    def errors(self):
        return [m["message"] for m in self.messages if m.get("type") == "error"]

    def _received(self, data):
        try:
            message = json.loads(data)
        except ValueError:
            if self.on_unreadable is None:
                raise
            message = None
        if self.on_unreadable is not None and type(message) is not dict:
            self.on_unreadable(data)
            return
        if self.keep_messages:
            self.messages.append(message)
        if self.on_message is not None:
            self.on_message(message)
        if not self._waiters:
            return
        for waiter in list(self._waiters):
            predicate, d = waiter
            if predicate(message):
                self._waiters.remove(waiter)
                d.callback(message)

    def _lost(self):
        waiters, self._waiters = self._waiters, []
        for _, d in waiters:
            d.errback(protocol.connectionDone)
        self.closed.callback(None)


class _LineClientProtocol(LineReceiver):
    delimiter = b"\n"
    MAX_LENGTH = 1 << 26

    def __init__(self, client, token=None):
        self.client = client
        self.token = token
        client._proto = self

    def connectionMade(self):
        send_at_once(self.transport)
        if self.token is not None:
            # Before anything else; the server's hello follows it.
            self.sendLine(json.dumps({"type": "auth", "token": self.token}).encode("utf-8"))

    def send_message(self, data):
        self.sendLine(data)

    def send_frame(self, data, binary):
        if binary:
            raise ValueError("a TCP connection carries no binary messages")
        self.transport.write(data)

    def drop(self):
        self.transport.abortConnection()

    def lineReceived(self, line):
        if line.strip():
            self.client._received(line)

    def connectionLost(self, reason):
        self.client._lost()


class _WebSocketClientProtocol(WebSocketClientProtocol):

    def onOpen(self):
        self.client = self.factory.client
        self.client._proto = self
        self.factory.opened.callback(self.client)

    def dataReceived(self, data):
        skip_debug_formatting(self, data)

    def send_message(self, data):
        self.sendMessage(data, isBinary=False)

    def send_frame(self, data, binary):
        self.sendMessage(data, isBinary=binary)

    def drop(self):
        self.transport.abortConnection()

    def onMessage(self, payload, isBinary):
        self.client._received(payload)

    def onClose(self, wasClean, code, reason):
        if not self.factory.opened.called:
            self.factory.opened.errback(HandshakeFailed(code, reason))
        else:
            self.client.close_code = self.remoteCloseCode
            self.client.close_reason = self.remoteCloseReason
            self.client._lost()


def _certificates(path):
    """The certificates in a PEM file."""
    from twisted.internet import ssl

    with open(path, "rb") as f:
        data = f.read()
    marker = b"-----BEGIN CERTIFICATE-----"
    blocks = [marker + block for block in data.split(marker)[1:]]
    if not blocks:
        raise ValueError("%s holds no PEM certificate" % (path,))
    return [ssl.Certificate.loadPEM(block) for block in blocks]


def tls_options(host, trust=None):
    """Client TLS options that verify the server's certificate for host
    against trust (a PEM file of the CA or self-signed certificates to trust)
    or, if None, the system's trust store."""
    from twisted.internet import ssl

    root = None if trust is None else ssl.trustRootFromCertificates(_certificates(trust))
    return ssl.optionsForClientTLS(host, trustRoot=root)


def _endpoint(reactor, host, port, tls=False, trust=None, timeout=30):
    endpoint = endpoints.HostnameEndpoint(reactor, host, port, timeout=timeout)
    if tls:
        endpoint = endpoints.wrapClientTLS(tls_options(host, trust), endpoint)
    return endpoint


def connect_tcp(reactor, host, port, token=None, tls=False, trust=None, client=None,
                timeout=30):
    """A Deferred firing with a connected StreamClient.

    token: sent in an auth message before anything else; tls: whether to
    speak TLS, verifying the server against trust (see tls_options);
    client: the StreamClient to connect [default: a new one]; timeout:
    seconds to open the TCP connection."""
    client = StreamClient() if client is None else client
    endpoint = _endpoint(reactor, host, port, tls, trust, timeout)
    d = endpoints.connectProtocol(endpoint, _LineClientProtocol(client, token))
    return d.addCallback(lambda _: client)


def connect_websocket(reactor, url, token=None, trust=None, protocols=None, headers=None,
                      client=None, timeout=30, handshake_timeout=None):
    """A Deferred firing with a StreamClient once the WebSocket is open, or
    failing with HandshakeFailed if the opening handshake does not complete.

    url: ``ws://`` or ``wss://`` (TLS, verified against trust: see
    tls_options); token: sent as ``Authorization: Bearer``; protocols: the
    subprotocols to offer; headers: more header fields for the handshake;
    client: the StreamClient to connect [default: a new one]; timeout:
    seconds to open the TCP connection; handshake_timeout: seconds the
    opening handshake may take [default: Autobahn's, 5]."""
    headers = dict(headers or {})
    if token is not None:
        headers["Authorization"] = "Bearer %s" % (token,)
    factory = WebSocketClientFactory(url, protocols=protocols, headers=headers)
    factory.protocol = _WebSocketClientProtocol
    factory.client = StreamClient() if client is None else client
    factory.opened = defer.Deferred()
    factory.setProtocolOptions(maxMessagePayloadSize=0, maxFramePayloadSize=0)
    if handshake_timeout is not None:
        factory.setProtocolOptions(openHandshakeTimeout=handshake_timeout)
    endpoint = _endpoint(reactor, factory.host, factory.port, factory.isSecure, trust,
                         timeout)
    d = endpoint.connect(factory)
    d.addCallback(lambda _: factory.opened)
    return d


SCHEMES = ("tcp", "tls", "ws", "wss")


def connect(reactor, address, token=None, trust=None):
    """``tcp://host:port``, ``tls://host:port``, ``ws://host:port[/path]`` or
    ``wss://host:port[/path]``: a Deferred firing with a connected StreamClient.

    token: the server's access token, if it wants one (TCP and TLS: an auth
    message first; WebSocket: an ``Authorization: Bearer`` header).  trust:
    for tls:// and wss://, a PEM file of the certificates to trust (a CA's,
    or the server's own self-signed one); None: the system's trust store."""
    scheme = address.partition("://")[0].lower() if "://" in address else ""
    if scheme not in SCHEMES:
        raise ValueError("address must start with tcp://, tls://, ws:// or wss://")
    if scheme in ("ws", "wss"):
        return connect_websocket(reactor, address, token=token, trust=trust)
    parts = urlsplit(address)
    try:
        port = parts.port
    except ValueError:
        port = None
    if not parts.hostname or port is None:
        raise ValueError("%s://HOST:PORT expected, got %r" % (scheme, address))
    return connect_tcp(reactor, parts.hostname, port, token=token, tls=scheme == "tls",
                       trust=trust)
