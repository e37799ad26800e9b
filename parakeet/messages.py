"""
The wire protocol's messages: parsing what clients send, building what the
server sends.  Transport-independent: a TCP line and a WebSocket message
carry the same JSON object.
"""

import base64
import binascii
import json

import attr

from .audio import AudioError, decode_samples

NO_FREE_STATE = "No free streaming state available."
SHUTTING_DOWN = "The server is shutting down."


class ProtocolError(ValueError):
    """A client message is malformed; str() says how, for an ``error`` reply."""


@attr.s(frozen=True, slots=True)
class Audio:
    samples = attr.ib(repr=False)
    final = attr.ib(default=False)


@attr.s(frozen=True, slots=True)
class Close:
    pass


@attr.s(frozen=True, slots=True)
class Ping:
    pass


def _audio(obj):
    final = obj.get("final", False)
    if not isinstance(final, bool):
        raise ProtocolError("'final' must be true or false")
    encoding = obj.get("encoding", "pcm16")
    if not isinstance(encoding, str):
        raise ProtocolError("'encoding' must be a string")
    data = obj.get("data", "")
    if data is None:
        data = ""
    if not isinstance(data, str):
        raise ProtocolError("'data' must be a base64 string")
    try:
        payload = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError("'data' is not valid base64")
    try:
        samples = decode_samples(payload, encoding)
    except AudioError as e:
        raise ProtocolError(str(e))
    return Audio(samples, final)


_PARSERS = {
    "audio": _audio,
    "close": lambda obj: Close(),
    "ping": lambda obj: Ping(),
}


def parse(raw):
    """One client message (bytes or str holding a JSON object) to a message value."""
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError("message is not valid UTF-8")
    try:
        obj = json.loads(raw)
    except RecursionError:
        raise ProtocolError("invalid JSON: nested too deeply")
    except ValueError as e:
        raise ProtocolError("invalid JSON: %s" % (e,))
    if not isinstance(obj, dict):
        raise ProtocolError("message must be a JSON object, got %s"
                            % type(obj).__name__)
    kind = obj.get("type")
    if kind is None:
        raise ProtocolError("unknown message type (the message has no 'type')")
    if not isinstance(kind, str):
        raise ProtocolError("unknown message type ('type' must be a string)")
    parser = _PARSERS.get(kind)
    if parser is None:
        raise ProtocolError("unknown message type: %r" % (kind[:64],))
    return parser(obj)


def encode(message):
    """A server message dict to compact JSON bytes (no delimiter)."""
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def hello(stream_id, sample_rate):
    return {"type": "hello", "stream_id": stream_id, "sample_rate": sample_rate}


def result(stream_id, text, token_ids, confidences, is_final, audio_ms):
    return {
        "type": "result",
        "stream_id": stream_id,
        "text": text,
        "token_ids": list(token_ids),
        "confidence_scores": list(confidences),
        "is_final": is_final,
        "audio_ms": audio_ms,
    }


def error(text):
    return {"type": "error", "message": text}


def pong():
    return {"type": "pong"}


def status(connected_streams):
    return {"type": "status", "connected_streams": connected_streams}
