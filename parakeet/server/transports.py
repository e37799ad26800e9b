"""
The transports: newline-delimited JSON over TCP, JSON messages over
WebSocket, and the one-shot status port.  Each turns bytes into complete
messages for a :class:`~parakeet.server.protocol.StreamSession`.
"""

import re

from autobahn.twisted.websocket import (
    ConnectionDeny, WebSocketServerFactory, WebSocketServerProtocol)
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import endpoints, protocol
from twisted.internet.interfaces import IHandshakeListener, INegotiated, IPushProducer
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from zope.interface import implementer

from . import messages
from ..audio import ENCODINGS, AudioError, check_rate
from ..sockets import send_at_once, skip_debug_formatting
from .auth import (
    AUTH_TIMEOUT_SECONDS, MAX_AUTH_LINE_BYTES, OPENAI_KEY_SUBPROTOCOL_PREFIX,
    POLICY_VIOLATION, SUBPROTOCOL,
    TOKEN_SUBPROTOCOL_PREFIX, Refusal, is_auth_message, normalize_origin, origin_allowed,
    tcp_refusal, token_subprotocols, websocket_refusal)
from .protocol import Channel, StreamSession

#: Seconds a failed WebSocket connection has to take the server's close
#: frame before it is aborted.
CLOSE_FLUSH_SECONDS = 5

#: A token offered as a subprotocol, in text that will be logged.
_TOKEN_IN_TEXT = re.compile("(%s|%s)" % (re.escape(TOKEN_SUBPROTOCOL_PREFIX),
                                         re.escape(OPENAI_KEY_SUBPROTOCOL_PREFIX))
                            + r'[^\s",]+')

#: How far past the message limit a WebSocket message may go before the
#: connection is failed (close code 1009) instead of the message refused.
WEBSOCKET_HARD_LIMIT_FACTOR = 4


#: Refusals and the like.  (Not a protocol attribute: Autobahn's protocols
#: log through their own ``log``.)
_log = Logger()


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


class Sessions:
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
        # Over TLS a connection with a producer still registered is never
        # shut down.
        self.proto.transport.unregisterProducer()
        self.proto.transport.loseConnection()


@implementer(IHandshakeListener)
class StreamLineProtocol(LineReceiver):
    """One stream per TCP connection; one JSON object per ``\\n``-ended line.

    Over TLS the stream starts once the TLS handshake is done.  With
    authentication on, the first line must be an auth message with a valid
    token: until then there is no stream, and any other line, a wrong token
    or silence for too long closes the connection with an error."""

    delimiter = b"\n"
    _discarding = False
    #: While the TLS handshake is under way: the call that gives up on it.
    _awaiting_tls = None
    #: While the client has yet to authenticate: the call that gives up on it.
    _awaiting_auth = None
    _refused = False
    _first_line = True

    def connectionMade(self):
        send_at_once(self.transport)
        channel = LineChannel(self)
        self.session = self.factory.session(channel, "tcp")
        # Pausing the LineReceiver, not just the transport, also stops it
        # handing on the lines it has already read.
        channel.flow = FlowControl(self.transport, self.session, reader=self)
        if INegotiated.providedBy(self.transport):
            # TLS (the one transport that negotiates): what is written before
            # the handshake is done waits, and pauses its producer, which
            # would stop reading the handshake itself.  A client that never
            # completes it takes no stream.
            seconds = self.factory.limits.idle_timeout or AUTH_TIMEOUT_SECONDS
            self._awaiting_tls = self.factory.reactor.callLater(
                seconds, self._tls_timeout, seconds)
            return
        self._start()

    def handshakeCompleted(self):
        if self._awaiting_tls is not None:
            self._awaiting_tls.cancel()
            self._awaiting_tls = None
            self._start()

    def _tls_timeout(self, seconds):
        self._awaiting_tls = None
        _log.info("dropped {peer}: no TLS handshake within {seconds} s",
                  peer=self.session.channel.peer, seconds=seconds)
        self.transport.abortConnection()

    def _start(self):
        if self.factory.auth is None:
            self.session.connection_made()
            return
        # A client that has not authenticated may not make the server hold
        # much of what it sends.
        self.MAX_LENGTH = min(self.MAX_LENGTH, MAX_AUTH_LINE_BYTES)
        seconds = self.factory.limits.idle_timeout or AUTH_TIMEOUT_SECONDS
        self._awaiting_auth = self.factory.reactor.callLater(
            seconds, self._auth_timeout, seconds)

    def _authenticate(self, line):
        self._awaiting_auth.cancel()
        self._awaiting_auth = None
        refusal = tcp_refusal(self.factory.auth, line)
        if refusal is not None:
            self._refuse(refusal)
            return
        self.MAX_LENGTH = self.factory.limits.max_message_bytes
        self.session.connection_made()

    def _auth_timeout(self, seconds):
        self._awaiting_auth = None
        self._refuse(Refusal("authentication required: no auth message within %g s"
                             % (seconds,), "no auth message in time"))

    def _refuse(self, refusal):
        self._refused = True
        channel = self.session.channel
        _log.info("refused {peer} over tcp: {reason}", peer=channel.peer,
                  reason=refusal.reason)
        self.factory.registry.metrics.refused("unauthorized")
        self.session.send_error(refusal.message, "unauthorized")
        channel.close()

    def dataReceived(self, data):
        if self._discarding:
            end = data.find(self.delimiter)
            if end < 0:
                return
            self._discarding = False
            data = data[end + 1:]
        LineReceiver.dataReceived(self, data)

    def lineReceived(self, line):
        if self._refused or not line.strip():
            return
        if self._awaiting_auth is not None:
            self._authenticate(line)
            return
        if self._first_line:
            self._first_line = False
            if self.factory.auth is None and is_auth_message(line):
                # A client with a token, at a server that needs none.
                return
        self.session.message_received(line)

    def lineLengthExceeded(self, line):
        if self._refused:
            return
        if self._awaiting_auth is not None:
            self._awaiting_auth.cancel()
            self._awaiting_auth = None
            self._refuse(Refusal(
                "authentication required: the first message must be an auth message "
                "of at most %d bytes" % (self.MAX_LENGTH,), "no auth message"))
            return
        # Refuse the line, skip to its end, and carry on with the next one.
        self.session.message_too_large()
        end = line.find(self.delimiter)
        if end < 0:
            self._discarding = True
        elif end + 1 < len(line):
            self.factory.reactor.callLater(0, self.dataReceived, line[end + 1:])

    def connectionLost(self, reason):
        for call in (self._awaiting_tls, self._awaiting_auth):
            if call is not None and call.active():
                call.cancel()
        self._awaiting_tls = self._awaiting_auth = None
        self.session.connection_lost()


class StreamLineFactory(Sessions, protocol.Factory):
    protocol = StreamLineProtocol

    def __init__(self, registry, loop, limits, reactor, auth=None):
        """auth: the TokenStore clients must present a token of, or None."""
        Sessions.__init__(self, registry, loop, limits)
        self.reactor = reactor
        self.auth = auth

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
    """One stream per WebSocket connection; one JSON object per message.

    A handshake from a web origin not allowed is refused (HTTP 403).  With
    authentication on, a handshake without a valid token still completes, so
    that a browser can read why: the client gets an error message and the
    close code 1008 (policy violation), and no stream is opened."""

    session = None
    _abort_later = None
    #: Why the client may not open a stream, if it may not.
    _refusal = None

    def failHandshake(self, reason, code=400, responseHeaders=None):
        # Autobahn logs the reason: a token offered as a subprotocol (say,
        # twice) must not get there.
        reason = _TOKEN_IN_TEXT.sub(r"\1...", reason)
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
        # the client does not take it in time.  (Over TLS a connection with a
        # producer still registered is never shut down.)
        self.transport.unregisterProducer()
        self.transport.loseConnection()
        if abort and self._abort_later is None:
            self._abort_later = self.factory.reactor.callLater(
                CLOSE_FLUSH_SECONDS, self.transport.abortConnection)

    def connectionMade(self):
        WebSocketServerProtocol.connectionMade(self)
        # Autobahn tries, but before it has read the option from the factory.
        send_at_once(self.transport)

    def dataReceived(self, data):
        skip_debug_formatting(self, data)

    def check_origin(self, request):
        """Refuse the handshake (HTTP 403) if it comes from a web origin not allowed."""
        self._peer_text = _peer(self.transport.getPeer())
        factory = self.factory
        if not origin_allowed(factory.allowed_origins, request.origin):
            _log.info("refused {peer} over websocket: origin {origin!r} not allowed "
                      "(--allowed-origins)", peer=self._peer_text,
                      origin=request.origin[:200])
            factory.registry.metrics.refused("origin")
            raise ConnectionDeny(403, "origin not allowed")

    def onConnect(self, request):
        self.check_origin(request)
        factory = self.factory
        # Browsers fail a connection that offered subprotocols if the server
        # selects none of them; a token must never be the one selected.
        protocol = SUBPROTOCOL if SUBPROTOCOL in request.protocols else None
        if protocol is None and token_subprotocols(request.protocols):
            raise ConnectionDeny(400, "a token subprotocol must be offered together "
                                      "with the subprotocol '%s'" % (SUBPROTOCOL,))
        if factory.auth is not None:
            self._refusal = websocket_refusal(factory.auth, request.headers,
                                              request.params, request.protocols)
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
        return protocol

    def onOpen(self):
        if self._refusal is not None:
            _log.info("refused {peer} over websocket: {reason}", peer=self._peer_text,
                      reason=self._refusal.reason)
            metrics = self.factory.registry.metrics
            metrics.refused("unauthorized")
            metrics.error_sent("unauthorized")
            self.sendMessage(messages.encode(messages.error(self._refusal.message)),
                             isBinary=False)
            # sendClose() takes only 1000 and 3000-4999; 1008 is the
            # protocol's own code for a policy violation (RFC 6455 7.4.1).
            self.sendCloseFrame(code=POLICY_VIOLATION,
                                reasonUtf8=self._refusal.reason.encode("utf-8"))
            return
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


class StreamWebSocketFactory(Sessions, WebSocketServerFactory):
    protocol = StreamWebSocketProtocol

    def __init__(self, registry, loop, limits, reactor, ping_interval=20.0, auth=None,
                 allowed_origins=None):
        """auth: the TokenStore clients must present a token of, or None;
        allowed_origins: the web origins (``scheme://host[:port]``) whose pages
        may connect, or None for any.  A handshake with no Origin header (not
        from a browser) is never refused for its origin."""
        Sessions.__init__(self, registry, loop, limits)
        WebSocketServerFactory.__init__(self)
        self.reactor = reactor
        self.auth = auth
        self.allowed_origins = None if allowed_origins is None else frozenset(
            normalize_origin(o) for o in allowed_origins)
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
                                # Origins are checked in onConnect (any, unless
                                # allowed_origins); Autobahn would refuse the
                                # "null" origin of file:// pages on its own.
                                allowNullOrigin=True,
                                autoPingInterval=ping_interval,
                                autoPingTimeout=ping_interval)


# Status and load balancer checks

class _OneLineProtocol(protocol.Protocol):
    """Writes one line and closes."""

    def connectionMade(self):
        self.transport.write(self.factory.line())
        self.transport.loseConnection()


class StatusFactory(protocol.Factory):
    """The status port: the guide's JSON line (with the state and capacity)."""

    protocol = _OneLineProtocol

    def __init__(self, health):
        self.health = health

    def line(self):
        return messages.encode(self.health.status()) + b"\n"


class AgentCheckFactory(protocol.Factory):
    """HAProxy's agent-check: one line of ``ready``/``drain``/``down`` words."""

    protocol = _OneLineProtocol

    def __init__(self, health):
        self.health = health

    def line(self):
        return self.health.agent_reply().encode("ascii")


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
