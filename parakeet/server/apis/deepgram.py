"""
Deepgram's live transcription: a WebSocket at ``/v1/listen``, its options
in the URL's query.

Binary messages carry the audio; text messages ``KeepAlive``, ``Finalize``,
``Configure`` and ``CloseStream``.  The server sends ``Results``: interim ones
(``is_final`` false, with ``interim_results=true``) for the utterance being
heard, a final one (``is_final`` true) when an utterance ends, with
``speech_final`` true when it ended on its own (the model's ``<EOU>`` or
silence) and ``from_finalize`` true when a ``Finalize`` ended it;
``SpeechStarted`` at an utterance's first word (``vad_events=true``);
``UtteranceEnd`` once ``utterance_end_ms`` of audio has passed after the
last word; and ``Metadata`` before it closes the connection.
"""

import hashlib
import json
import time
import uuid

import attr
from autobahn.twisted.websocket import ConnectionDeny

from ...audio import AudioError, check_rate
from ..auth import api_refusal
from ..messages import KeytermLimitError, ProtocolError, check_keyterms
from ..transports import (
    FlowControl, StreamWebSocketFactory, StreamWebSocketProtocol, WebSocketChannel)
from ..turns import END, START

#: Deepgram's names of the raw encodings the server decodes.
ENCODINGS = {"linear16": "pcm16", "mulaw": "mulaw", "alaw": "alaw"}

#: Options the server reads; any other is accepted and ignored (docs/apis.rst).
BOOLEANS = ("interim_results", "vad_events")

#: Both channels of Deepgram's ``channel_index`` and ``channel``: the first of one.
CHANNEL = [0, 1]


class OptionError(ValueError):
    """A query option cannot be honoured; str() says which and why."""


@attr.s(frozen=True)
class Options:
    """What a request's query asks of the server."""

    #: The raw encoding (ENCODINGS' values), or None: a WAV file's header says.
    encoding = attr.ib(default=None)
    sample_rate = attr.ib(default=None)
    interim_results = attr.ib(default=False)
    #: Whether a final result says ``speech_final`` (``endpointing=false``: never).
    endpointing = attr.ib(default=True)
    #: ms of audio after the last word before ``UtteranceEnd``; None: never.
    utterance_end_ms = attr.ib(default=None)
    vad_events = attr.ib(default=False)
    #: ``utterances=true`` (pre-recorded): list the utterances.
    utterances = attr.ib(default=False)
    #: ``smart_format`` or ``numerals``: final words as written (``--itn``).
    written = attr.ib(default=False)
    #: ``keyterm`` and ``keywords`` (without their boosts): phrases to favour.
    keyterms = attr.ib(default=())
    #: ``language``: the stream's language (``multi``: the model picks).
    language = attr.ib(default=None)


def _last(params, name):
    values = params.get(name) or params.get(name.encode("ascii"))
    if not values:
        return None
    value = values[-1]
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _boolean(params, name):
    value = _last(params, name)
    if value is None:
        return False
    if value.lower() not in ("true", "false"):
        raise OptionError("%s must be true or false, got %r" % (name, value[:20]))
    return value.lower() == "true"


def _whole(value, name, low, high):
    if not (value.isascii() and value.isdigit() and low <= int(value) <= high):
        raise OptionError("%s must be a whole number from %d to %d, got %r"
                          % (name, low, high, value[:20]))
    return int(value)


def options(params):
    """The Options of a query (each name to a list of values, str or bytes);
    OptionError if one cannot be honoured."""
    encoding = _last(params, "encoding")
    if encoding is not None:
        if encoding not in ENCODINGS:
            raise OptionError("encoding %r is not supported: use linear16, mulaw or alaw, "
                              "or send a WAV file and no encoding" % (encoding[:20],))
        encoding = ENCODINGS[encoding]
    rate = _last(params, "sample_rate")
    if rate is not None:
        try:
            rate = check_rate(_whole(rate, "sample_rate", 0, 10 ** 6))
        except AudioError as e:
            raise OptionError(str(e))
    if encoding is not None and rate is None:
        raise OptionError("sample_rate is required with encoding")
    channels = _last(params, "channels")
    if channels is not None and channels != "1":
        raise OptionError("only one channel is supported (channels=1)")
    if _boolean(params, "multichannel"):
        raise OptionError("multichannel audio is not supported")
    endpointing = _last(params, "endpointing")
    if endpointing is not None and endpointing.lower() not in ("true", "false"):
        _whole(endpointing, "endpointing", 0, 60000)
    utterance_end = _last(params, "utterance_end_ms")
    if utterance_end is not None:
        utterance_end = _whole(utterance_end, "utterance_end_ms", 0, 60000)
    terms = [term.decode("utf-8", "replace") if isinstance(term, bytes) else term
             for name in ("keyterm", "keywords")
             for term in params.get(name) or params.get(name.encode("ascii")) or ()]
    try:
        keyterms = check_keyterms([term.rsplit(":", 1)[0] if ":" in term else term
                                   for term in terms])
    except ProtocolError as e:
        raise OptionError(str(e))
    language = _last(params, "language")
    return Options(encoding, rate, _boolean(params, "interim_results"),
                   endpointing is None or endpointing.lower() != "false",
                   utterance_end, _boolean(params, "vad_events"),
                   _boolean(params, "utterances"),
                   _boolean(params, "smart_format") or _boolean(params, "numerals"),
                   keyterms, "auto" if language == "multi" else language)


def check_language(options, model):
    """OptionError unless model (a ModelInfo; None while loading) takes the
    options' language."""
    if options.language is not None and model is not None:
        try:
            model.check_language(options.language)
        except ValueError as e:
            raise OptionError(str(e))


def model_info(model):
    """(uuid, model_info) naming the model served."""
    name = model or "unknown"
    model_uuid = str(uuid.uuid5(uuid.NAMESPACE_URL, "parakeet-server:" + name))
    return model_uuid, {"name": name, "version": "", "arch": "parakeet-server"}


def words(listed):
    """An utterance's words (turns' shape) as Deepgram lists them."""
    return [{"word": w["word"], "punctuated_word": w["word"],
             "start": round(w["start_ms"] / 1000.0, 3), "end": round(w["end_ms"] / 1000.0, 3),
             "confidence": w["confidence"]} for w in listed]


def alternative(listed):
    found = words(listed)
    confidence = (round(sum(w["confidence"] for w in found) / len(found), 4)
                  if found else 0.0)
    return {"transcript": " ".join(w["word"] for w in found), "confidence": confidence,
            "words": found}


def metadata(request_id, model, duration, payload=b""):
    """A ``Metadata`` message's fields, and a pre-recorded response's metadata."""
    model_uuid, info = model_info(model)
    return {"transaction_key": "deprecated", "request_id": request_id,
            "sha256": hashlib.sha256(payload).hexdigest(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()),
            "duration": round(duration, 3), "channels": 1, "models": [model_uuid],
            "model_info": {model_uuid: info}}


def error_body(message, code="Bad Request", request_id=None):
    """Deepgram's error response body."""
    return {"err_code": code, "err_msg": message, "request_id": request_id or str(uuid.uuid4())}


def wav_header(data):
    """(encoding, rate, header length) of a WAV file's header at the start of
    data, or None if data does not yet hold all of it; AudioError if it is no
    WAV header the server decodes."""
    if len(data) < 12:
        return None
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise AudioError("the audio is not a WAV file: give encoding and sample_rate in "
                         "the URL for raw audio")
    at, fmt = 12, None
    while True:
        if len(data) < at + 8:
            return None
        chunk, size = data[at:at + 4], int.from_bytes(data[at + 4:at + 8], "little")
        if chunk == b"data":
            break
        if len(data) < at + 8 + size:
            return None
        if chunk == b"fmt ":
            fmt = data[at + 8:at + 8 + size]
        at += 8 + size + (size & 1)
    if fmt is None or len(fmt) < 16:
        raise AudioError("the WAV file has no format chunk before its data")
    tag, channels = int.from_bytes(fmt[0:2], "little"), int.from_bytes(fmt[2:4], "little")
    rate, bits = int.from_bytes(fmt[4:8], "little"), int.from_bytes(fmt[14:16], "little")
    encoding = {(1, 16): "pcm16", (3, 32): "f32", (7, 8): "mulaw", (6, 8): "alaw"}.get((tag, bits))
    if encoding is None or channels != 1:
        raise AudioError("the WAV file must be mono 16-bit PCM, 32-bit float, mu-law or "
                         "A-law (got format %d, %d bits, %d channels)" % (tag, bits, channels))
    check_rate(rate)
    return encoding, rate, at + 8


class ListenChannel(WebSocketChannel):
    """Turns the session's results into Deepgram's messages."""

    def __init__(self, proto, peer, options):
        WebSocketChannel.__init__(self, proto, peer)
        self.options = options
        self.session = None
        self.model = None
        self.request_id = str(uuid.uuid4())
        self._cursor_ms = 0.0     # where the audio not yet in a final result starts
        self._interim = None      # the transcript of the last interim result
        self._finalizes = 0       # Finalize messages whose flush is not answered
        self._last_word_end = None  # ms, while an UtteranceEnd is due
        self._speaking = False    # SpeechStarted sent, the utterance not ended

    def emit(self, message):
        WebSocketChannel.send(self, message)

    def send(self, message):
        if message["type"] == "hello":
            self.model = message.get("model")
        elif message["type"] == "result":
            self._result(message)

    def error(self, text, kind):
        self.emit({"type": "Error", "variant": kind, "description": text, "message": text})

    def close(self):
        stream = self.session.stream
        if stream is not None:
            # Every Finalize is answered, those the end of the stream overtook too.
            while self._finalizes > 0:
                self._finalizes -= 1
                self._results([], True, stream.audio_ms, from_finalize=True)
            self.emit(dict(metadata(self.request_id, self.model, stream.audio_seconds),
                           type="Metadata"))
        WebSocketChannel.close(self)

    def _results(self, listed, is_final, audio_ms, speech_final=False, from_finalize=False):
        model_uuid, info = model_info(self.model)
        self.emit({"type": "Results", "channel_index": CHANNEL,
                   "start": round(self._cursor_ms / 1000.0, 3),
                   "duration": round(max(0.0, audio_ms - self._cursor_ms) / 1000.0, 3),
                   "is_final": is_final, "speech_final": speech_final,
                   "from_finalize": from_finalize,
                   "channel": {"alternatives": [alternative(listed)]},
                   "metadata": {"request_id": self.request_id, "model_uuid": model_uuid,
                                "model_info": info}})

    def _result(self, message):
        options, turns = self.options, self.session.turns
        audio_ms = message["audio_ms"]
        turn = message.get("turn_detection")
        utterance = message.get("utterance") if turn == END else None
        # At an utterance's first words; or at its end, if it began and
        # ended within one step.
        heard = turns.open_words() if turn == START else (utterance or {}).get("words")
        if options.vad_events and heard and not self._speaking:
            self.emit({"type": "SpeechStarted", "channel": CHANNEL,
                       "timestamp": round(heard[0]["start_ms"] / 1000.0, 3)})
            self._speaking = True
        if utterance is not None:
            self._speaking = False
            reason = utterance["reason"]
            from_finalize = reason in ("flush", "final") and self._finalizes > 0
            if from_finalize:
                self._finalizes -= 1
            if utterance["words"] or from_finalize:
                self._results(utterance["words"], True, audio_ms,
                              options.endpointing and reason in ("eou", "silence"),
                              from_finalize)
                self._cursor_ms = audio_ms
            self._interim = None
            if utterance["words"]:
                self._last_word_end = utterance["end_ms"]
        elif options.interim_results and turns.in_utterance:
            listed = turns.open_words()
            transcript = " ".join(w["word"] for w in listed)
            if transcript and transcript != self._interim:
                self._interim = transcript
                self._results(listed, False, audio_ms)
        due = self._last_word_end
        if (options.utterance_end_ms is not None and due is not None
                and not turns.in_utterance and audio_ms - due >= options.utterance_end_ms):
            self._last_word_end = None
            self.emit({"type": "UtteranceEnd", "channel": CHANNEL,
                       "last_word_end": round(due / 1000.0, 3)})

    def control(self, raw):
        """A text message: KeepAlive, Finalize or CloseStream."""
        try:
            message = json.loads(raw)
        except (ValueError, RecursionError):
            message = None
        kind = message.get("type") if isinstance(message, dict) else None
        if kind == "KeepAlive":
            self.session.keep_alive()
        elif kind == "Finalize":
            self._finalizes += 1
            self.session.flush()
        elif kind == "CloseStream":
            self.session.close_stream()
        elif kind == "Configure":
            self._configure(message)
        else:
            self.session.send_error(
                "a text message must be {\"type\": \"KeepAlive\"}, {\"type\": \"Finalize\"}, "
                "{\"type\": \"Configure\"} or {\"type\": \"CloseStream\"}; audio goes in "
                "binary messages", "bad_json" if message is None else "unknown_type")

    def _configure(self, message):
        """Configure: new keyterms (replacing all, [] for none) and
        features (numerals, smart_format) from the audio not yet decoded on;
        answered with ConfigureSuccess, or ConfigureFailure changing nothing."""
        answer = {"request_id": self.request_id}
        terms, features = message.get("keyterms"), message.get("features")
        try:
            keyterms = None if terms is None else check_keyterms(terms)
            if features is not None and not (
                    isinstance(features, dict) and all(isinstance(v, bool) for v in features.values())):
                raise ProtocolError("'features' must map feature names to true or false")
        except ProtocolError as e:
            code = ("CONFIGURE_KEYTERM_LIMIT_EXCEEDED" if isinstance(e, KeytermLimitError)
                    else "CONFIGURE_INVALID")
            self.emit(dict(answer, type="ConfigureFailure", code=code, description=str(e)))
            return
        if keyterms is not None:
            self.session.set_keyterms(keyterms)
            answer["keyterms"] = list(keyterms)
        written = [v for k, v in (features or {}).items() if k in ("numerals", "smart_format")]
        if written:
            self.session.itn = any(written) and self.session.loop.itn is not None
        self.emit(dict(answer, type="ConfigureSuccess"))


class ListenProtocol(StreamWebSocketProtocol):
    """One live transcription per connection."""

    channel = None
    _header = b""

    def onConnect(self, request):
        self.check_origin(request)
        factory = self.factory
        refusal = api_refusal(factory.auth, request.headers, request.protocols)
        if refusal is not None:
            factory.registry.metrics.refused("unauthorized")
            raise ConnectionDeny(401, refusal.message)
        registry = factory.registry
        try:
            self.options = options(request.params)
            check_language(self.options, registry.model)
        except OptionError as e:
            raise ConnectionDeny(400, str(e))
        if registry.geometry is None or registry.closed or not registry.free:
            reason = ("loading" if registry.geometry is None
                      else "draining" if registry.closed else "full")
            registry.metrics.refused(reason)
            raise ConnectionDeny(429 if reason == "full" else 503, {
                "full": "all %d streams are in use: try again shortly" % registry.capacity,
                "draining": "the server is shutting down",
                "loading": "the server is still loading its model: try again shortly",
            }[reason])
        # A browser's client offers ["token", KEY]: select "token".
        return "token" if "token" in request.protocols else None

    def onOpen(self):
        options = self.options
        self.channel = ListenChannel(self, self._peer_text, options)
        self.session = self.channel.session = self.factory.session(self.channel,
                                                                   "deepgram_live")
        self.channel.flow = FlowControl(self.transport, self.session)
        self.session.connection_made(options.sample_rate, options.encoding)
        if self.session.stream is not None:
            # A result after every chunk, so that UtteranceEnd comes on time.
            self.session.every_chunk = True
            self.session.itn = options.written and self.factory.loop.itn is not None
            if options.keyterms:
                self.session.set_keyterms(options.keyterms)
            if options.language is not None:
                self.session.set_language(options.language)
            if options.encoding is None:
                self._header = bytearray()

    def onMessage(self, payload, isBinary):
        session = self.session
        if session is None or session.stream is None:
            return
        if len(payload) > self.factory.limits.max_message_bytes:
            session.message_too_large(len(payload))
        elif not isBinary:
            self.channel.control(payload)
        elif self._header is not None and self.options.encoding is None:
            self._wav(payload)
        else:
            session.audio_received(payload)

    def _wav(self, payload):
        """Audio before the WAV header has been read."""
        self._header += payload
        try:
            found = wav_header(bytes(self._header[:1 << 16]))
        except AudioError as e:
            self.session.send_error(str(e), "bad_audio")
            self.session.close_stream()
            self._header = None
            return
        if found is None:
            if len(self._header) >= 1 << 16:
                self.session.send_error("no WAV header in the first 64 KiB", "bad_audio")
                self.session.close_stream()
                self._header = None
            return
        encoding, rate, length = found
        rest, self._header = bytes(self._header[length:]), None
        self.options = attr.evolve(self.options, encoding=encoding, sample_rate=rate)
        self.session.configure(rate, encoding)
        if rest:
            self.session.audio_received(rest)


class ListenFactory(StreamWebSocketFactory):
    protocol = ListenProtocol
