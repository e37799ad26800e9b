"""
What one audio message costs the reactor thread, with no model involved.

    python -m parakeet.measuring.reactorcost --messages 2000 --chunk-ms 100

feeds audio messages to the server's own TCP protocol (a line of JSON with
base64 pcm16), to its stream session as a binary WebSocket message would
(raw pcm16), and to its WebSocket protocol in binary frames (the same, with
the frame's parsing and unmasking), through a real registry and chunk
cutter, and prints the CPU time per message.  The reactor thread does this
work for every message of every stream, so it bounds how many streams one
reactor can feed.
"""

import base64
import json
import os
import struct
import sys
import time

import numpy as np
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python import usage

from ..audio import encode_samples
from ..contract import ChunkGeometry
from ..server.protocol import Limits
from ..server.registry import StreamRegistry
from ..server.transports import StreamLineFactory, StreamWebSocketFactory

#: The geometry of the served models (160 ms chunks at 16 kHz).
GEOMETRY = ChunkGeometry(hop=160, n_fft=512, pad=256, first_frames=9,
                         chunk_frames=16, cache_frames=9, sample_rate=16000)


class Options(usage.Options):
    optParameters = [
        ("messages", None, 2000, "Audio messages per measurement.", int),
        ("chunk-ms", None, 100, "Audio per message, in ms.", int),
    ]


class _NoModel:
    """What a session asks of the engine, for a loop that decodes nothing."""

    frame_ms = 80
    eou_id = None
    vad = None


class _IdleLoop:
    """Stands in for the decode loop: chunks are cut, not decoded."""

    engine = _NoModel()
    itn = None

    def wake(self):
        pass


def _registry():
    """A registry for one stream, and limits no measurement reaches."""
    registry = StreamRegistry(1, GEOMETRY, GEOMETRY.sample_rate, MemoryReactorClock())
    return registry, Limits(max_stream_seconds=1e9, max_backlog_seconds=1e9, idle_timeout=0)


def _streams(n_messages):
    registry, limits = _registry()
    return registry, StreamLineFactory(registry, _IdleLoop(), limits, MemoryReactorClock())


def _drain(registry):
    for stream in registry.in_turn():
        while stream.cutter.next_chunk() is not None:
            pass


def json_line_cost(samples, n_messages):
    """CPU seconds per newline-delimited JSON audio message over TCP."""
    registry, factory = _streams(n_messages)
    proto = factory.buildProtocol(None)
    proto.makeConnection(StringTransport())
    line = json.dumps({"type": "audio", "encoding": "pcm16",
                       "data": base64.b64encode(encode_samples(samples)).decode()})
    data = line.encode() + b"\n"
    started = time.process_time()
    for _ in range(n_messages):
        proto.dataReceived(data)
        _drain(registry)
    return (time.process_time() - started) / n_messages


def binary_cost(samples, n_messages):
    """CPU seconds per raw pcm16 message, as a binary WebSocket message."""
    registry, factory = _streams(n_messages)
    proto = factory.buildProtocol(None)
    proto.makeConnection(StringTransport())
    payload = encode_samples(samples)
    session = proto.session
    started = time.process_time()
    for _ in range(n_messages):
        session.audio_received(payload, "pcm16")
        _drain(registry)
    return (time.process_time() - started) / n_messages


def _websocket():
    """A registry and the server's WebSocket protocol, its handshake done."""
    registry, limits = _registry()
    factory = StreamWebSocketFactory(registry, _IdleLoop(), limits, MemoryReactorClock(),
                                     ping_interval=0)
    proto = factory.buildProtocol(None)
    proto.makeConnection(StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 1)))
    proto.dataReceived(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                       b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                       b"Sec-WebSocket-Key: " + base64.b64encode(os.urandom(16)) +
                       b"\r\n\r\n")
    if proto.session is None:
        raise RuntimeError("the WebSocket handshake failed: %r"
                           % (proto.transport.value()[:200],))
    return registry, proto


def masked_binary_frame(payload):
    """payload in one binary frame as a client sends it (masked)."""
    mask = os.urandom(4)
    masked = (np.frombuffer(payload, np.uint8)
              ^ np.resize(np.frombuffer(mask, np.uint8), len(payload))).tobytes()
    # The shortest length field, as RFC 6455 requires.
    n = len(payload)
    length = (bytes([0x80 | n]) if n < 126 else
              bytes([0x80 | 126]) + struct.pack("!H", n) if n < 1 << 16 else
              bytes([0x80 | 127]) + struct.pack("!Q", n))
    return b"\x82" + length + mask + masked


def websocket_cost(samples, n_messages):
    """CPU seconds per raw pcm16 message in a binary WebSocket frame, read by
    the server's WebSocket protocol (Autobahn's framing and unmasking
    included)."""
    registry, proto = _websocket()
    frame = masked_binary_frame(encode_samples(samples))
    started = time.process_time()
    for _ in range(n_messages):
        proto.dataReceived(frame)
        _drain(registry)
    return (time.process_time() - started) / n_messages


def main(argv=None):
    options = Options()
    try:
        options.parseOptions(sys.argv[1:] if argv is None else argv)
    except usage.UsageError as e:
        raise SystemExit("%s\n%s" % (options, e))
    n, ms = options["messages"], options["chunk-ms"]
    samples = np.random.default_rng(0).uniform(-0.5, 0.5, GEOMETRY.sample_rate * ms // 1000)
    samples = samples.astype(np.float32)
    for name, cost in (("JSON line, base64 pcm16", json_line_cost),
                       ("binary message, raw pcm16", binary_cost),
                       ("binary WebSocket frame", websocket_cost)):
        seconds = cost(samples, n)
        # One reactor thread at 100 % feeds this many real-time streams.
        streams = (ms / 1000) / seconds
        print("%-28s %8.1f us per %d ms message: one core feeds %6.0f real-time streams"
              % (name, seconds * 1e6, ms, streams))


if __name__ == "__main__":
    main()
