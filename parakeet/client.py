"""
A Twisted client for the server, over TCP or WebSocket.

    client = yield connect(reactor, "ws://127.0.0.1:8000")
    hello = yield client.next(lambda m: m["type"] == "hello")
    client.send_audio(samples, final=True)
    final = yield client.final()

Every message the server sends is kept in ``client.messages``, in order.
"""

import base64
import json

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import defer, endpoints, protocol
from twisted.protocols.basic import LineReceiver

from .audio import encode_samples


class StreamClient:
    """One connection to the server, whichever the transport."""

    def __init__(self):
        self.messages = []
        self.closed = defer.Deferred()
        self._waiters = []
        self._proto = None
        #: Called with every message as it arrives, when set.
        self.on_message = None

    # sending

    def send(self, message):
        """Send a message dict as JSON."""
        self.send_raw(json.dumps(message).encode("utf-8"))

    def send_raw(self, data):
        """Send bytes as one message (a line or a WebSocket text message)."""
        self._proto.send_message(data)

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
        message = json.loads(data)
        self.messages.append(message)
        if self.on_message is not None:
            self.on_message(message)
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

    def __init__(self, client):
        self.client = client
        client._proto = self

    def send_message(self, data):
        self.sendLine(data)

    def drop(self):
        self.transport.abortConnection()

    def lineReceived(self, line):
        self.client._received(line)

    def connectionLost(self, reason):
        self.client._lost()


class _WebSocketClientProtocol(WebSocketClientProtocol):

    def onOpen(self):
        self.client = self.factory.client
        self.client._proto = self
        self.factory.opened.callback(self.client)

    def send_message(self, data):
        self.sendMessage(data, isBinary=False)

    def drop(self):
        self.transport.abortConnection()

    def onMessage(self, payload, isBinary):
        self.client._received(payload)

    def onClose(self, wasClean, code, reason):
        if not self.factory.opened.called:
            self.factory.opened.errback(ConnectionError(
                "WebSocket handshake failed: %s %s" % (code, reason)))
        else:
            self.client._lost()


def connect_tcp(reactor, host, port):
    """A Deferred firing with a connected StreamClient."""
    client = StreamClient()
    endpoint = endpoints.HostnameEndpoint(reactor, host, port)
    d = endpoints.connectProtocol(endpoint, _LineClientProtocol(client))
    return d.addCallback(lambda _: client)


def connect_websocket(reactor, url):
    """A Deferred firing with a StreamClient once the WebSocket is open."""
    factory = WebSocketClientFactory(url)
    factory.protocol = _WebSocketClientProtocol
    factory.client = StreamClient()
    factory.opened = defer.Deferred()
    factory.setProtocolOptions(maxMessagePayloadSize=0, maxFramePayloadSize=0)
    endpoint = endpoints.HostnameEndpoint(reactor, factory.host, factory.port)
    d = endpoint.connect(factory)
    d.addCallback(lambda _: factory.opened)
    return d


def connect(reactor, address):
    """``tcp://host:port`` or ``ws://host:port[/path]``."""
    if address.startswith("ws://"):
        return connect_websocket(reactor, address)
    if address.startswith("tcp://"):
        host, _, port = address[len("tcp://"):].rpartition(":")
        return connect_tcp(reactor, host.strip("[]"), int(port))
    raise ValueError("address must start with tcp:// or ws://")
