"""
OpenAI's Realtime API, transcription sessions: a WebSocket at
``/v1/realtime?intent=transcription``.

The client appends base64 audio (``input_audio_buffer.append``); the server
answers with OpenAI's events.  With turn detection on (``server_vad``, the
default, or ``semantic_vad``) each utterance the session's turn tracking
finds is an item: ``input_audio_buffer.speech_started`` at its first word,
``conversation.item.input_audio_transcription.delta`` as its words are
decoded, and at its end (the model's ``<EOU>``, or silence)
``speech_stopped``, ``committed`` and ``completed`` with the transcript.
With ``turn_detection: null`` an item runs from one
``input_audio_buffer.commit`` to the next, however many utterances it holds.
"""

import base64
import binascii
import json
import math

import attr
from autobahn.twisted.websocket import ConnectionDeny

from ...audio import AudioError, check_rate
from .. import messages
from ..auth import POLICY_VIOLATION, api_refusal
from ..messages import ProtocolError
from .transcriptions import prompt_keyterms
from ..transports import (
    FlowControl, StreamWebSocketFactory, StreamWebSocketProtocol, WebSocketChannel)
from ..turns import END

#: What a browser's client offers beside its key; selected when offered.
SUBPROTOCOL = "realtime"

#: The API's default input: 24 kHz pcm16.
DEFAULT_RATE = 24000

#: Input formats: the API's (``audio.input.format.type``) and its beta's
#: (``input_audio_format``) names, to (encoding, rate or None: the format's).
FORMATS = {
    "audio/pcm": ("pcm16", None),
    "audio/pcmu": ("mulaw", 8000),
    "audio/pcma": ("alaw", 8000),
    "pcm16": ("pcm16", DEFAULT_RATE),
    "g711_ulaw": ("mulaw", 8000),
    "g711_alaw": ("alaw", 8000),
}
TURN_DETECTIONS = ("server_vad", "semantic_vad")
LOGPROBS = "item.input_audio_transcription.logprobs"

#: The error code an error event carries, by what the error is about
#: (``metrics.ERROR_KINDS``).
ERROR_CODES = {
    "bad_json": "invalid_json",
    "unknown_type": "invalid_type",
    "too_large": "message_too_large",
    "after_end": "session_ended",
    "full": "server_full",
    "draining": "server_shutting_down",
    "loading": "server_loading",
    "idle_timeout": "idle_timeout",
    "max_stream_seconds": "session_expired",
    "shutdown": "server_shutting_down",
    "internal": "server_error",
    "unauthorized": "invalid_api_key",
}
SERVER_ERRORS = ("full", "draining", "loading", "shutdown", "internal")
#: The close code after a refusal: try again later (RFC 6455 section 7.4.1).
TRY_AGAIN_LATER = 1013


class EventError(ValueError):
    """A client event is malformed; str() says how; param names the field."""

    def __init__(self, message, param=None, kind="bad_message", code=None):
        ValueError.__init__(self, message)
        self.param = param
        self.kind = kind
        #: The API's own code for it, if it has one.
        self.code = code


def error_event(message, kind, param=None, event_id=None, code=None):
    """The ``error`` part of an error event."""
    return {"type": "server_error" if kind in SERVER_ERRORS else "invalid_request_error",
            "code": code or ERROR_CODES.get(kind, "invalid_value"), "message": message,
            "param": param, "event_id": event_id}


@attr.s(slots=True)
class Item:
    """The conversation item being transcribed."""

    id = attr.ib()
    start_ms = attr.ib()
    end_ms = attr.ib(default=None)
    text = attr.ib(default="")
    words = attr.ib(factory=list)


def _format(value):
    """(encoding, rate, format as the session shows it) of a format field."""
    if isinstance(value, str):
        name, rate = value, None
    elif isinstance(value, dict) and isinstance(value.get("type"), str):
        name, rate = value["type"], value.get("rate")
    else:
        raise EventError("the audio format must be an object with a 'type'", "format")
    if name not in FORMATS:
        raise EventError("unsupported audio format %r (supported: audio/pcm, audio/pcmu, "
                         "audio/pcma)" % (name[:40],), "format")
    encoding, fixed = FORMATS[name]
    if rate is None:
        rate = fixed or DEFAULT_RATE
    elif fixed is not None and rate != fixed:
        raise EventError("%s audio is at %d Hz" % (name, fixed), "format.rate")
    try:
        check_rate(rate)
    except AudioError as e:
        raise EventError(str(e), "format.rate", e.kind)
    shown = {"type": {"mulaw": "audio/pcmu", "alaw": "audio/pcma"}.get(encoding, "audio/pcm")}
    if encoding == "pcm16":
        shown["rate"] = rate
    return encoding, rate, shown


def _turn_detection(value):
    """The turn detection setting as the session keeps it (None: manual commits)."""
    if value is None:
        return None
    if not isinstance(value, dict) or value.get("type", "server_vad") not in TURN_DETECTIONS:
        raise EventError("turn_detection must be null or have type server_vad or "
                         "semantic_vad", "turn_detection")
    kept = {"type": value.get("type", "server_vad")}
    silence = value.get("silence_duration_ms")
    if silence is not None:
        if isinstance(silence, bool) or not isinstance(silence, int) or not 0 <= silence <= 10000:
            raise EventError("silence_duration_ms must be a whole number of ms from 0 to 10000",
                             "turn_detection.silence_duration_ms")
        kept["silence_duration_ms"] = silence
    threshold = value.get("threshold")
    if threshold is not None:
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) \
                or not 0.0 <= threshold <= 1.0:
            raise EventError("threshold must be a number from 0 to 1",
                             "turn_detection.threshold")
        kept["threshold"] = float(threshold)
    return kept


class RealtimeChannel(WebSocketChannel):
    """Turns the session's results into Realtime events, and the client's
    events into the session's calls."""

    def __init__(self, proto, peer):
        WebSocketChannel.__init__(self, proto, peer)
        self.session = None
        self.model = None
        self.format = {"type": "audio/pcm", "rate": DEFAULT_RATE}
        self.turn_detection = {"type": "server_vad"}
        self.transcription = {"language": "en"}
        self.logprobs = False
        self.refused = False
        self._events = 0
        self._items = 0
        self._item = None
        self._previous = None
        self._seen = 0            # how much of the session's text went out as deltas
        self._pending = []        # "commit" or "clear", one per flush sent
        self._committed_at = 0    # samples received at the last commit
        self._client_event = None  # the event_id of the event being handled
        self._param = None         # the field an error is about
        self._code = None          # and the API's code for it, if it has one

    # events to the client

    def emit(self, type, **fields):
        self._events += 1
        event = {"type": type, "event_id": "event_%d" % (self._events,)}
        event.update(fields)
        WebSocketChannel.send(self, event)

    def describe(self):
        """The session, as session.created and session.updated show it."""
        stream = self.session.stream
        transcription = dict(self.transcription)
        transcription["model"] = self.model
        return {"type": "transcription", "object": "realtime.transcription_session",
                "id": "sess_%d" % (stream.id,),
                "audio": {"input": {"format": dict(self.format),
                                    "transcription": transcription,
                                    "turn_detection": self.turn_detection,
                                    "noise_reduction": None}},
                "include": [LOGPROBS] if self.logprobs else []}

    def send(self, message):
        if message["type"] == "hello":
            self.model = message.get("model")
            self.emit("session.created", session=self.describe())
        elif message["type"] == "result":
            self._result(message)

    def error(self, text, kind):
        if kind in ("full", "draining", "loading"):
            self.refused = True
        self.emit("error", error=error_event(text, kind, self._param, self._client_event,
                                             self._code))

    def close(self):
        if self.refused:
            self.proto.sendCloseFrame(code=TRY_AGAIN_LATER)
        else:
            WebSocketChannel.close(self)

    def _result(self, message):
        text = self.session.text
        delta, self._seen = text[self._seen:], len(text)
        if delta.strip():
            self._delta(delta, message)
        utterance = message.get("utterance")
        if message.get("turn_detection") == END and utterance is not None:
            self._utterance_end(utterance)

    def _delta(self, delta, message):
        if self._item is None:
            # The utterance this result ends, or else the one still open.
            utterance = message.get("utterance") if message.get("turn_detection") == END \
                else None
            words = utterance["words"] if utterance else self.session.turns.open_words()
            start = words[0]["start_ms"] if words else message["audio_ms"]
            self._open(start)
            delta = delta.lstrip()
        self._item.text += delta
        fields = {"item_id": self._item.id, "content_index": 0, "delta": delta}
        if self.logprobs:
            fields["logprobs"] = [{
                "token": delta, "bytes": list(delta.encode("utf-8")),
                "logprob": round(sum(math.log(max(c, 1e-6))
                                     for c in message["confidence_scores"]), 4)}]
        self.emit("conversation.item.input_audio_transcription.delta", **fields)

    def _open(self, start_ms):
        self._items += 1
        self._item = Item("item_%d_%d" % (self.session.stream.id, self._items), start_ms)
        if self.turn_detection is not None:
            self.emit("input_audio_buffer.speech_started", item_id=self._item.id,
                      audio_start_ms=int(start_ms))

    def _utterance_end(self, utterance):
        what = None
        if utterance["reason"] == "flush" and self._pending:
            what = self._pending.pop(0)
        if what == "clear":
            self._item = None
            return
        item = self._item
        if item is not None:
            item.words += utterance["words"]
            item.end_ms = utterance["end_ms"]
        manual = self.turn_detection is None
        if manual and what != "commit" and utterance["reason"] != "final":
            return  # the item goes on until the client commits
        if item is None:
            if what != "commit":
                return
            # A commit of audio with no words in it.
            self._open(utterance["start_ms"])
            item = self._item
            item.end_ms = utterance["end_ms"]
        self._complete(item)

    def _complete(self, item):
        self._item = None
        if self.turn_detection is not None:
            self.emit("input_audio_buffer.speech_stopped", item_id=item.id,
                      audio_end_ms=int(item.end_ms))
        self.emit("input_audio_buffer.committed", item_id=item.id,
                  previous_item_id=self._previous)
        # The words as written (with --itn), which the deltas, sent as they
        # were heard, may not be.
        transcript = " ".join(w["word"] for w in item.words) if item.words \
            else item.text.strip()
        fields = {"item_id": item.id, "content_index": 0, "transcript": transcript,
                  "usage": {"type": "duration",
                            "seconds": round(max(0, item.end_ms - item.start_ms) / 1000.0, 3)}}
        if self.logprobs:
            fields["logprobs"] = [{
                "token": (" " if i else "") + w["word"],
                "bytes": list(((" " if i else "") + w["word"]).encode("utf-8")),
                "logprob": round(math.log(max(w["confidence"], 1e-6)), 4)}
                for i, w in enumerate(item.words)]
        self.emit("conversation.item.input_audio_transcription.completed", **fields)
        self._previous = item.id

    # events from the client

    def client_event(self, raw):
        self._client_event = self._param = self._code = None
        try:
            event = json.loads(raw)
        except (ValueError, RecursionError) as e:
            self.session.send_error("the event is not valid JSON: %s" % (e,), "bad_json")
            return
        if not isinstance(event, dict) or not isinstance(event.get("type"), str):
            self.session.send_error("an event must be a JSON object with a 'type'",
                                    "unknown_type")
            return
        event_id = event.get("event_id")
        self._client_event = event_id if isinstance(event_id, str) else None
        handler = self.HANDLERS.get(event["type"])
        if handler is None:
            self.session.send_error(
                "unsupported event type %r (a transcription session takes: %s)"
                % (event["type"][:64], ", ".join(sorted(self.HANDLERS))), "unknown_type")
            return
        try:
            handler(self, event)
        except EventError as e:
            self._param, self._code = e.param, e.code
            self.session.send_error(str(e), e.kind)
            self._param = self._code = None

    def _update(self, event, legacy=False):
        session = event.get("session")
        if not isinstance(session, dict):
            raise EventError("'session' must be an object", "session")
        if legacy:
            audio_input = {"format": session.get("input_audio_format"),
                           "transcription": session.get("input_audio_transcription")}
            if "turn_detection" in session:
                audio_input["turn_detection"] = session["turn_detection"]
        else:
            if session.get("type", "transcription") != "transcription":
                raise EventError("this server serves transcription sessions only "
                                 "(session.type 'transcription')", "session.type")
            audio_input = (session.get("audio") or {}).get("input") or {}
            if not isinstance(audio_input, dict):
                raise EventError("'session.audio.input' must be an object", "session.audio")
        # Check every field before changing anything.
        fmt = audio_input.get("format")
        fmt = None if fmt is None else _format(fmt)
        transcription = audio_input.get("transcription")
        if transcription is not None:
            if not isinstance(transcription, dict):
                raise EventError("'transcription' must be an object", "transcription")
            language = transcription.get("language")
            if language:
                try:
                    language = self.session.registry.model.check_language(language)
                except ValueError as e:
                    raise EventError(str(e), "transcription.language")
        detection = self.turn_detection
        if "turn_detection" in audio_input:
            detection = _turn_detection(audio_input["turn_detection"])
        include = session.get("include")
        if include is not None and not isinstance(include, list):
            raise EventError("'include' must be a list", "include")
        if fmt is not None:
            encoding, rate, shown = fmt
            stream = self.session.stream
            if (encoding, rate) != (self.session.binary_encoding, stream.input_rate):
                if stream.received and rate != stream.input_rate:
                    raise EventError("the audio's rate can only change before the first "
                                     "audio is appended", "format", "bad_sample_rate")
                self.session.configure(rate, encoding)
            self.format = shown
        if transcription is not None:
            self.transcription = {k: transcription[k] for k in ("language", "prompt")
                                  if isinstance(transcription.get(k), str)}
            keywords = transcription.get("keywords") or []
            if not isinstance(keywords, list):
                raise EventError("'keywords' must be a list", "transcription.keywords")
            try:
                keyterms = prompt_keyterms(self.transcription.get("prompt"), keywords)
            except ProtocolError as e:
                raise EventError(str(e), "transcription.keywords")
            self.session.set_keyterms(keyterms)
            if language:
                self.session.set_language(language)
        self.turn_detection = detection
        if detection is not None:
            turns = self.session.turns
            turns.settings = attr.evolve(
                turns.settings,
                min_silence_ms=detection.get("silence_duration_ms",
                                             turns.settings.min_silence_ms),
                vad_threshold=detection.get("threshold", turns.settings.vad_threshold))
        if include is not None:
            self.logprobs = LOGPROBS in include
        self.emit("transcription_session.updated" if legacy else "session.updated",
                  session=self.describe())

    def _append(self, event):
        audio = event.get("audio")
        if not isinstance(audio, str):
            raise EventError("'audio' must be a base64 string", "audio")
        try:
            payload = base64.b64decode(audio, validate=True)
        except (binascii.Error, ValueError):
            raise EventError("'audio' is not valid base64", "audio", "bad_audio")
        self.session.audio_received(payload)

    def _commit(self, event):
        if self.session.stream.received == self._committed_at:
            raise EventError("the input audio buffer is empty: append audio before "
                             "committing", None, "bad_message",
                             "input_audio_buffer_commit_empty")
        self._committed_at = self.session.stream.received
        self._pending.append("commit")
        self.session.flush()

    def _clear(self, event):
        # What was appended is decoded; the words it holds are dropped.
        self._committed_at = self.session.stream.received
        self._pending.append("clear")
        self.session.flush()
        self.emit("input_audio_buffer.cleared")

    HANDLERS = {
        "session.update": _update,
        "transcription_session.update": lambda self, event: self._update(event, True),
        "input_audio_buffer.append": _append,
        "input_audio_buffer.commit": _commit,
        "input_audio_buffer.clear": _clear,
    }


class RealtimeProtocol(StreamWebSocketProtocol):
    """One transcription session per connection."""

    channel = None

    def onConnect(self, request):
        self.check_origin(request)
        intent = request.params.get("intent", ["transcription"])[-1]
        if intent != "transcription":
            raise ConnectionDeny(400, "this server serves transcription sessions only: "
                                      "connect with ?intent=transcription")
        self._refusal = api_refusal(self.factory.auth, request.headers, request.protocols)
        return SUBPROTOCOL if SUBPROTOCOL in request.protocols else None

    def onOpen(self):
        if self._refusal is not None:
            metrics = self.factory.registry.metrics
            metrics.refused("unauthorized")
            metrics.error_sent("unauthorized")
            event = {"type": "error", "event_id": "event_1",
                     "error": error_event(self._refusal.message, "unauthorized")}
            self.sendMessage(messages.encode(event), isBinary=False)
            self.sendCloseFrame(code=POLICY_VIOLATION,
                                reasonUtf8=self._refusal.reason.encode("utf-8"))
            return
        self.channel = RealtimeChannel(self, self._peer_text)
        self.session = self.channel.session = self.factory.session(self.channel,
                                                                   "openai_realtime")
        self.channel.flow = FlowControl(self.transport, self.session)
        self.session.connection_made(DEFAULT_RATE, "pcm16")

    def onMessage(self, payload, isBinary):
        if self.session is None or self.session.stream is None:
            return
        if len(payload) > self.factory.limits.max_message_bytes:
            self.session.message_too_large(len(payload))
        elif isBinary:
            self.session.send_error("binary messages are not part of the Realtime API: "
                                    "send input_audio_buffer.append events", "bad_message")
        else:
            self.channel.client_event(payload)


class RealtimeFactory(StreamWebSocketFactory):
    protocol = RealtimeProtocol
