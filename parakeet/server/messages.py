"""
The wire protocol's messages: parsing what clients send, building what the
server sends.  Transport-independent: a TCP line and a WebSocket message
carry the same JSON object.
"""

import base64
import binascii
import json

import attr

from ..audio import AudioError, check_rate, decode_samples, ENCODINGS

NO_FREE_STATE = "No free streaming state available."
SHUTTING_DOWN = "The server is shutting down."
LOADING = "The server is still loading its model; try again shortly."

#: When a stream gets results (``config``'s ``results``): when new tokens
#: are decoded (or the turn state changes), or after every decoded chunk.
RESULTS = ("tokens", "every_chunk")


class ProtocolError(ValueError):
    """A client message is malformed; str() says how, for an ``error`` reply,
    and kind what it is about (a fixed word the metrics count it under:
    ``bad_json``, ``unknown_type``, ``bad_audio``, ``bad_sample_rate`` or
    ``bad_message``)."""

    def __init__(self, message, kind="bad_message"):
        ValueError.__init__(self, message)
        self.kind = kind


class KeytermLimitError(ProtocolError):
    """More key terms, or longer ones, than a stream may have."""


@attr.s(frozen=True, slots=True)
class Audio:
    samples = attr.ib(repr=False)
    final = attr.ib(default=False)
    #: The rate the client declared on this message, if it did.
    sample_rate = attr.ib(default=None)


@attr.s(frozen=True, slots=True)
class Config:
    """Settings for the stream's audio, before the first audio message."""

    sample_rate = attr.ib(default=None)
    encoding = attr.ib(default=None)
    results = attr.ib(default=None)  #: one of RESULTS, or None: unchanged
    itn = attr.ib(default=None)  #: written forms on or off; None: unchanged
    keyterms = attr.ib(default=None)  #: phrases to favour (a tuple); None: unchanged
    language = attr.ib(default=None)  #: the stream's language code; None: unchanged


@attr.s(frozen=True, slots=True)
class Flush:
    pass


@attr.s(frozen=True, slots=True)
class Close:
    pass


@attr.s(frozen=True, slots=True)
class Ping:
    pass


def _rate(obj):
    if "sample_rate" not in obj:
        return None
    try:
        return check_rate(obj["sample_rate"])
    except AudioError as e:
        raise ProtocolError(str(e), e.kind)


def _encoding(obj, default):
    encoding = obj.get("encoding", default)
    if encoding is not default and not isinstance(encoding, str):
        raise ProtocolError("'encoding' must be a string")
    return encoding


def _audio(obj, encoding):
    final = obj.get("final", False)
    if not isinstance(final, bool):
        raise ProtocolError("'final' must be true or false")
    encoding = _encoding(obj, encoding)
    rate = _rate(obj)
    data = obj.get("data", "")
    if data is None:
        data = ""
    if not isinstance(data, str):
        raise ProtocolError("'data' must be a base64 string")
    try:
        payload = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError("'data' is not valid base64", "bad_audio")
    try:
        samples = decode_samples(payload, encoding)
    except AudioError as e:
        raise ProtocolError(str(e), e.kind)
    return Audio(samples, final, rate)


def _config(obj, _):
    encoding = _encoding(obj, None)
    if encoding is not None and encoding not in ENCODINGS:
        raise ProtocolError("unknown audio encoding %r (expected one of: %s)"
                            % (encoding[:32], ", ".join(ENCODINGS)), "bad_audio")
    results = obj.get("results")
    if results is not None and results not in RESULTS:
        raise ProtocolError("unknown 'results' %s (expected one of: %s)"
                            % (json.dumps(results)[:40], ", ".join(RESULTS)))
    itn = obj.get("itn")
    if itn is not None and not isinstance(itn, bool):
        raise ProtocolError("'itn' must be true or false")
    keyterms = obj.get("keyterms")
    if keyterms is not None:
        keyterms = check_keyterms(keyterms)
    language = obj.get("language")
    if language is not None and not isinstance(language, str):
        raise ProtocolError("'language' must be a string such as \"de-DE\"")
    return Config(_rate(obj), encoding, results, itn, keyterms, language)


#: At most this many key terms a stream, each at most this many characters.
MAX_KEYTERMS = 100
MAX_KEYTERM_CHARS = 50


def check_keyterms(keyterms):
    """A stream's key terms as a tuple of lower-case phrases; ProtocolError
    if they are not a list of at most MAX_KEYTERMS phrases of words."""
    if not isinstance(keyterms, list) or not all(isinstance(k, str) for k in keyterms):
        raise ProtocolError("'keyterms' must be a list of strings")
    if len(keyterms) > MAX_KEYTERMS:
        raise KeytermLimitError("at most %d keyterms, got %d" % (MAX_KEYTERMS, len(keyterms)))
    phrases = []
    for term in keyterms:
        phrase = " ".join(term.lower().split())
        if not phrase or len(phrase) > MAX_KEYTERM_CHARS:
            raise KeytermLimitError("a keyterm must be 1 to %d characters, got %r"
                                % (MAX_KEYTERM_CHARS, term[:60]))
        if not all(ch.isalpha() or ch in " '" for ch in phrase):
            raise ProtocolError("keyterm %r: only letters, spaces and apostrophes (the model "
                                "writes words, so write numbers as words)" % (term[:60],))
        phrases.append(phrase)
    return tuple(phrases)


_PARSERS = {
    "audio": _audio,
    "config": _config,
    "flush": lambda obj, _: Flush(),
    "close": lambda obj, _: Close(),
    "ping": lambda obj, _: Ping(),
}


def parse(raw, encoding="pcm16"):
    """One client message (bytes or str holding a JSON object) to a message
    value; encoding: how audio that names none is encoded."""
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError("message is not valid UTF-8", "bad_json")
    try:
        obj = json.loads(raw)
    except RecursionError:
        raise ProtocolError("invalid JSON: nested too deeply", "bad_json")
    except ValueError as e:
        raise ProtocolError("invalid JSON: %s" % (e,), "bad_json")
    if not isinstance(obj, dict):
        raise ProtocolError("message must be a JSON object, got %s"
                            % type(obj).__name__, "bad_json")
    kind = obj.get("type")
    if kind is None:
        raise ProtocolError("unknown message type (the message has no 'type')",
                            "unknown_type")
    if not isinstance(kind, str):
        raise ProtocolError("unknown message type ('type' must be a string)",
                            "unknown_type")
    parser = _PARSERS.get(kind)
    if parser is None:
        raise ProtocolError("unknown message type: %r" % (kind[:64],), "unknown_type")
    return parser(obj, encoding)


def encode(message):
    """A server message dict to compact JSON bytes (no delimiter)."""
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def hello(stream_id, sample_rate, model=None):
    """model: the :class:`parakeet.server.registry.ModelInfo` of the model
    served, if known: its name, and all it says in ``model_info``."""
    message = {"type": "hello", "stream_id": stream_id, "sample_rate": sample_rate}
    if model is not None:
        message["model"] = model.name
        message["model_info"] = model.describe()
    return message


def result(stream_id, text, token_ids, confidences, is_final, audio_ms, turn=None,
           spoken_text=None):
    """A result; turn: the turn-detection fields (turn_detection, last_state
    and, when an utterance ends, utterance); spoken_text: with written forms
    on, the transcript as spoken (text holds it as written)."""
    message = {
        "type": "result",
        "stream_id": stream_id,
        "text": text,
        "token_ids": list(token_ids),
        "confidence_scores": list(confidences),
        "is_final": is_final,
        "audio_ms": audio_ms,
    }
    if spoken_text is not None:
        message["spoken_text"] = spoken_text
    if turn:
        message.update(turn)
    return message


def error(text):
    return {"type": "error", "message": text}


def pong():
    return {"type": "pong"}


def status(connected_streams, max_streams, state, model=None):
    """state: ``loading``, ``ready``, ``full`` or ``draining``; model: as
    for :func:`hello`."""
    message = {"type": "status", "connected_streams": connected_streams,
               "max_streams": max_streams, "state": state}
    if model is not None:
        message["model_info"] = model.describe()
    return message
