"""
The stream protocol of the server guide, independent of the transport.

A :class:`StreamSession` lives as long as one client connection.  The
transport hands it each complete message (a TCP line or a WebSocket message)
and tells it when the connection is lost; the session answers through a
:class:`Channel`, which the transport implements.
"""

import attr
from twisted.logger import Logger

from . import messages
from .audio import AudioError, decode_samples
from .registry import RegistryFull


class Channel:
    """What a session needs from its transport (an interface, by convention)."""

    peer = "unknown"

    def send(self, message):
        """Send one message dict to the client."""
        raise NotImplementedError

    def close(self):
        """Close the connection once what was sent has been written."""
        raise NotImplementedError


@attr.s(frozen=True)
class Limits:
    """What a client may send."""

    max_stream_seconds = attr.ib(default=300.0)
    max_message_bytes = attr.ib(default=1 << 20)


class StreamSession:

    log = Logger()

    def __init__(self, registry, loop, limits, channel, transport):
        self.registry = registry
        self.loop = loop
        self.limits = limits
        self.channel = channel
        self.transport = transport
        self.stream = None
        self.connected = False

    # transport events

    def connection_made(self):
        self.connected = True
        try:
            self.stream = self.registry.open(self.channel.peer, self.transport, self)
        except RegistryFull:
            self.log.info("refused {peer} over {transport}: all {capacity} streams "
                          "in use", peer=self.channel.peer, transport=self.transport,
                          capacity=self.registry.capacity)
            self.channel.send(messages.error(messages.NO_FREE_STATE))
            self.channel.close()
            return
        self.channel.send(messages.hello(self.stream.id, self.registry.input_rate))

    def message_received(self, raw):
        if self.stream is None:
            return
        try:
            message = messages.parse(raw)
        except messages.ProtocolError as e:
            self.channel.send(messages.error(str(e)))
            return
        if isinstance(message, messages.Ping):
            self.channel.send(messages.pong())
        elif isinstance(message, messages.Close):
            self._finish("close")
        elif isinstance(message, messages.Audio):
            self._audio(message)

    def audio_received(self, payload, encoding):
        """Raw audio bytes outside JSON (a binary WebSocket message)."""
        if self.stream is None:
            return
        try:
            samples = decode_samples(payload, encoding)
        except AudioError as e:
            self.channel.send(messages.error(str(e)))
            return
        self._audio(messages.Audio(samples))

    def message_too_large(self, size=None):
        self.channel.send(messages.error(
            "message too large: the limit is %d bytes%s"
            % (self.limits.max_message_bytes,
               "" if size is None else " (got %d)" % (size,))))

    def connection_lost(self):
        self.connected = False
        if self.stream is not None and self.stream in self.registry:
            self._finish("disconnected")

    # audio

    def _audio(self, message):
        stream = self.stream
        if stream.finishing:
            self.channel.send(messages.error(
                "audio after the end of the stream (%s) was ignored"
                % (stream.end_reason,)))
            return
        samples = message.samples
        room = int(self.limits.max_stream_seconds * stream.input_rate) - stream.received
        if len(samples) > room:
            stream.push(samples[:max(room, 0)])
            self.channel.send(messages.error(
                "stream exceeded --max-stream-seconds=%g: audio after %.2f s was not "
                "decoded; the stream is being finalized"
                % (self.limits.max_stream_seconds, stream.audio_seconds)))
            self._finish("max-stream-seconds")
            return
        stream.push(samples)
        if message.final:
            self._finish("final")

    def _finish(self, reason):
        if not self.stream.finishing:
            self.stream.finish(reason)
            self.loop.step()

    # decode loop events

    def stream_result(self, stream, result):
        if not self.connected:
            return
        if result.token_ids or result.is_last:
            self.channel.send(messages.result(
                stream.id, stream.text.strip(), result.token_ids, result.confidences,
                result.is_last, stream.audio_ms))
        if result.is_last:
            self.channel.close()

    def stream_failed(self, stream, reason):
        if self.connected:
            self.channel.send(messages.error(reason))
            self.channel.close()
