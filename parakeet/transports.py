"""
The transports: newline-delimited JSON over TCP, JSON messages over
WebSocket, and the one-shot status port.  Each turns bytes into complete
messages for a :class:`~parakeet.protocol.StreamSession`.
"""

from autobahn.twisted.websocket import (
    ConnectionDeny, WebSocketServerFactory, WebSocketServerProtocol)
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import endpoints, protocol
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from zope.interface import implementer

from . import messages
from .audio import ENCODINGS, AudioError, check_rate
from .protocol import Channel, StreamSession

#: Seconds a failed WebSocket connection has to take the server's close
#: frame before it is aborted.
CLOSE_FLUSH_SECONDS = 5

#: How far past the message limit a WebSocket message may go before the
#: connection is failed (close code 1009) instead of the message refused.
WEBSOCKET_HARD_LIMIT_FACTOR = 4


def _peer(address):
    host = getattr(address, "host", None)
    if host is None:
        return str(address)
    return "[%s]:%d" % (host, address.port) if ":" in host else "%s:%d" % (host, address.port)


@implementer(IPushProducer)
class FlowControl:
    """Reading from one connection, paused while any reason holds.

    It is also the producer the server's writes come from: the transport
    pauses it when the client leaves too much unread, which pauses reading
    too, and tells the session, which gives the client ``--write-timeout``
    seconds to catch up.
    """

    UNREAD = "unread output"

    def __init__(self, transport, session, reader=None):
        """reader: what pauses reading, the transport unless given."""
        self.transport = transport
        self.session = session
        self.reader = reader or transport
        self.reasons = set()
        transport.registerProducer(self, True)

    def pause_reading(self, reason):
        if not self.reasons:
            self.reader.pauseProducing()
        self.reasons.add(reason)

    def resume_reading(self, reason):
        if reason in self.reasons:
            self.reasons.discard(reason)
            if not self.reasons:
                self.reader.resumeProducing()

    def pauseProducing(self):
        self.pause_reading(self.UNREAD)
        self.session.write_blocked()

    def resumeProducing(self):
        self.resume_reading(self.UNREAD)
        self.session.write_unblocked()

    def stopProducing(self):
        pass


class _Channel(Channel):
    """What both stream transports' channels share."""

    flow = None

    def abort(self):
        self.proto.transport.abortConnection()

    def pause_reading(self, reason):
        self.flow.pause_reading(reason)

    def resume_reading(self, reason):
        self.flow.resume_reading(reason)


class _Sessions:
    """What every stream transport's factory shares: the registry and the loop."""

    def __init__(self, registry, loop, limits):
        self.registry = registry
        self.loop = loop
        self.limits = limits

    def session(self, channel, transport):
        return StreamSession(self.registry, self.loop, self.limits, channel, transport)


# TCP

class LineChannel(_Channel):

    def __init__(self, proto):
        self.proto = proto
        self.peer = _peer(proto.transport.getPeer())

    def send(self, message):
        self.proto.sendLine(messages.encode(message))

    def close(self):
        self.proto.transport.loseConnection()


class StreamLineProtocol(LineReceiver):
    """One stream per TCP connection; one JSON object per ``\\n``-ended line."""

    delimiter = b"\n"
    _discarding = False

    def connectionMade(self):
        channel = LineChannel(self)
        self.session = self.factory.session(channel, "tcp")
        # Pausing the LineReceiver, not just the transport, also stops it
        # handing on the lines it has already read.
        channel.flow = FlowControl(self.transport, self.session, reader=self)
        self.session.connection_made()

    def dataReceived(self, data):
        if self._discarding:
            end = data.find(self.delimiter)
            if end < 0:
                return
            self._discarding = False
            data = data[end + 1:]
        LineReceiver.dataReceived(self, data)

    def lineReceived(self, line):
        if line.strip():
            self.session.message_received(line)

    def lineLengthExceeded(self, line):
        # Refuse the line, skip to its end, and carry on with the next one.
        self.session.message_too_large()
        end = line.find(self.delimiter)
        if end < 0:
            self._discarding = True
        elif end + 1 < len(line):
            self.factory.reactor.callLater(0, self.dataReceived, line[end + 1:])

    def connectionLost(self, reason):
        self.session.connection_lost()


class StreamLineFactory(_Sessions, protocol.Factory):
    protocol = StreamLineProtocol

    def __init__(self, registry, loop, limits, reactor):
        _Sessions.__init__(self, registry, loop, limits)
        self.reactor = reactor

    def buildProtocol(self, addr):
        proto = protocol.Factory.buildProtocol(self, addr)
        proto.MAX_LENGTH = self.limits.max_message_bytes
        return proto


# WebSocket

class WebSocketChannel(_Channel):

    def __init__(self, proto, peer):
        self.proto = proto
        self.peer = peer

    def send(self, message):
        self.proto.sendMessage(messages.encode(message), isBinary=False)

    def close(self):
        self.proto.sendClose(code=1000)


class StreamWebSocketProtocol(WebSocketServerProtocol):
    """One stream per WebSocket connection; one JSON object per message."""

    session = None
    _abort_later = None

    def failHandshake(self, reason, code=400, responseHeaders=None):
        # Autobahn sends its handshake errors with no header fields; two
        # status codes must carry one (RFC 9110 sections 15.5.6 and 15.5.22).
        headers = list(responseHeaders or [])
        if code == 405:
            headers.append(("Allow", "GET"))
        elif code == 426:
            headers += [("Upgrade", "websocket"), ("Connection", "Upgrade")]
        WebSocketServerProtocol.failHandshake(self, reason, code, headers)

    def _closeConnection(self, abort=False):
        # Where Autobahn fails a connection over a bad close frame it queues
        # its own close frame and then aborts, which throws the frame away.
        # Close gracefully, so what was queued is written, and abort only if
        # the client does not take it in time.
        self.transport.loseConnection()
        if abort and self._abort_later is None:
            self._abort_later = self.factory.reactor.callLater(
                CLOSE_FLUSH_SECONDS, self.transport.abortConnection)

    def onConnect(self, request):
        self._peer_text = _peer(self.transport.getPeer())
        # The URL may say how the client's audio comes (browsers capture at
        # their own rate, and binary messages carry no JSON to say it in).
        self.encoding = request.params.get("encoding", [None])[-1]
        if self.encoding is not None and self.encoding not in ENCODINGS:
            raise ConnectionDeny(400, "unknown audio encoding %r in the URL (expected "
                                      "one of: %s)" % (self.encoding[:32],
                                                       ", ".join(ENCODINGS)))
        self.sample_rate = rate = request.params.get("sample_rate", [None])[-1]
        if rate is not None:
            try:
                self.sample_rate = check_rate(
                    int(rate) if rate.isascii() and rate.isdigit() and len(rate) < 7 else rate)
            except AudioError as e:
                raise ConnectionDeny(400, "%s in the URL" % (e,))

    def onOpen(self):
        channel = WebSocketChannel(self, self._peer_text)
        self.session = self.factory.session(channel, "websocket")
        channel.flow = FlowControl(self.transport, self.session)
        self.session.connection_made(self.sample_rate, self.encoding)

    def onMessage(self, payload, isBinary):
        if self.session is None:
            return
        if len(payload) > self.factory.limits.max_message_bytes:
            self.session.message_too_large(len(payload))
        elif isBinary:
            self.session.audio_received(payload)
        else:
            self.session.message_received(payload)

    def onClose(self, wasClean, code, reason):
        # Autobahn leaves its closing-handshake timer running when the peer
        # drops the TCP connection instead of answering our close frame.
        if self.closeHandshakeTimeoutCall is not None:
            self.closeHandshakeTimeoutCall.cancel()
            self.closeHandshakeTimeoutCall = None
        if self._abort_later is not None and self._abort_later.active():
            self._abort_later.cancel()
        if self.session is not None:
            self.session.connection_lost()


class StreamWebSocketFactory(_Sessions, WebSocketServerFactory):
    protocol = StreamWebSocketProtocol

    def __init__(self, registry, loop, limits, reactor, ping_interval=20.0):
        _Sessions.__init__(self, registry, loop, limits)
        WebSocketServerFactory.__init__(self)
        self.reactor = reactor
        hard = limits.max_message_bytes * WEBSOCKET_HARD_LIMIT_FACTOR
        # Text that is not UTF-8 gets an error message like any other bad
        # input instead of failing the connection.  A connection that must
        # fail gets a close frame saying why before the TCP connection ends.
        # Pings keep proxies from closing quiet connections and find peers
        # that vanished without closing.
        self.setProtocolOptions(maxMessagePayloadSize=hard, maxFramePayloadSize=hard,
                                utf8validateIncoming=False, failByDrop=False,
                                # Autobahn's timers round down to whole seconds,
                                # and a client must have the final result (sent
                                # just before the close) well before the server
                                # gives up on the closing handshake.
                                closeHandshakeTimeout=10,
                                # A plain HTTP request gets an error status, not
                                # Autobahn's status page.
                                webStatus=False,
                                autoPingInterval=ping_interval,
                                autoPingTimeout=ping_interval)


# Status

class StatusProtocol(protocol.Protocol):
    """Writes one status line and closes."""

    def connectionMade(self):
        status = messages.status(len(self.factory.registry))
        self.transport.write(messages.encode(status) + b"\n")
        self.transport.loseConnection()


class StatusFactory(protocol.Factory):
    protocol = StatusProtocol

    def __init__(self, registry):
        self.registry = registry


# Listening

def tcp_endpoint(host, port):
    return "tcp:%d:interface=%s" % (port, endpoints.quoteStringArgument(host))


class Listener(StreamServerEndpointService):
    """Listens on an endpoint string, logs where, and fails start-up if it cannot."""

    log = Logger()
    _raiseSynchronously = True

    def __init__(self, reactor, description, factory, what):
        StreamServerEndpointService.__init__(
            self, endpoints.serverFromString(reactor, description), factory)
        self.description = description
        self.what = what
        self.port = None
        self.setName(what)

    def privilegedStartService(self):
        StreamServerEndpointService.privilegedStartService(self)
        self._waitingForPort.addCallback(self._listening)

    def _listening(self, port):
        self.port = port
        self.log.info("listening for {what} on {address}", what=self.what,
                      address=_peer(port.getHost()))
        return port
