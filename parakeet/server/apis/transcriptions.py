"""
OpenAI's audio transcriptions: ``POST /v1/audio/transcriptions``, the file
in a multipart form; the answer as ``json``, ``text``, ``srt``, ``vtt`` or
``verbose_json``, or with ``stream=true`` as server-sent events
(``transcript.text.delta`` as the words are decoded, then
``transcript.text.done``).
"""

import io
import json
import math
import re

from twisted.web.server import NOT_DONE_YET

from ..messages import MAX_KEYTERM_CHARS, MAX_KEYTERMS, ProtocolError, check_keyterms
from . import uploads
from .httpapi import UploadResource, field

FORMATS = ("json", "text", "srt", "vtt", "verbose_json")
GRANULARITIES = ("segment", "word")

#: An error's OpenAI type and code, by what it is about.
_CODES = {
    "unauthorized": ("invalid_request_error", "invalid_api_key"),
    "full": ("rate_limit_error", "server_full"),
    "draining": ("server_error", "server_shutting_down"),
    "loading": ("server_error", "server_loading"),
    "internal": ("server_error", "server_error"),
}


def prompt_keyterms(prompt, keywords=()):
    """Key terms from OpenAI's ``prompt`` (its comma-, semicolon- or
    line-separated phrases of words; other text is context the model cannot
    use) and ``keywords``."""
    phrases = list(keywords)
    for part in re.split(r"[,;\n]", prompt or ""):
        phrase = " ".join(part.lower().split())
        if phrase and len(phrase) <= MAX_KEYTERM_CHARS and all(
                ch.isalpha() or ch in " '" for ch in phrase):
            phrases.append(phrase)
    return check_keyterms(list(dict.fromkeys(phrases))[:MAX_KEYTERMS])


def _clock(seconds, separator):
    ms = int(round(seconds * 1000))
    return "%02d:%02d:%02d%s%03d" % (ms // 3600000, ms // 60000 % 60, ms // 1000 % 60,
                                     separator, ms % 1000)


def cues(utterances, separator):
    """Each utterance with words as (start, end, text), times as subtitles write them."""
    return [(_clock(u["start_ms"] / 1000.0, separator), _clock(u["end_ms"] / 1000.0, separator),
             u["text"]) for u in utterances if u["words"]]


def srt(utterances):
    return "".join("%d\n%s --> %s\n%s\n\n" % (i + 1, start, end, text)
                   for i, (start, end, text) in enumerate(cues(utterances, ",")))


def vtt(utterances):
    return "WEBVTT\n\n" + "".join("%s --> %s\n%s\n\n" % cue for cue in cues(utterances, "."))


def _logprob(confidence):
    return round(math.log(max(confidence, 1e-6)), 4)


def verbose(transcript, granularities):
    said = [u for u in transcript.utterances if u["words"]]
    body = {"task": "transcribe", "language": "english",
            "duration": round(transcript.duration, 3), "text": transcript.text,
            "usage": {"type": "duration", "seconds": round(transcript.duration, 3)}}
    if "segment" in granularities:
        body["segments"] = [{
            "id": i, "seek": 0, "start": u["start_ms"] / 1000.0, "end": u["end_ms"] / 1000.0,
            "text": " " + u["text"], "tokens": [], "temperature": 0.0,
            "avg_logprob": round(sum(_logprob(w["confidence"]) for w in u["words"])
                                 / len(u["words"]), 4),
            "compression_ratio": 1.0, "no_speech_prob": 0.0} for i, u in enumerate(said)]
    if "word" in granularities:
        body["words"] = [{"word": w["word"], "start": w["start_ms"] / 1000.0,
                          "end": w["end_ms"] / 1000.0} for u in said for w in u["words"]]
    return body


class TranscriptionsResource(UploadResource):

    transport = "openai_file"

    def error_body(self, request, status, message, kind, param=None):
        kind_type, code = _CODES.get(kind, ("invalid_request_error", "invalid_value"))
        return self.answer_json(request, {"error": {
            "message": message, "type": kind_type, "param": param, "code": code}}, status)

    def render_POST(self, request):
        refused = self.refuse(request)
        if refused is not None:
            return refused
        ctype = (request.getHeader(b"content-type") or b"").decode("latin-1")
        files = request.args.get(b"file")
        if not ctype.lower().startswith("multipart/form-data") or not files:
            return self.error(request, 400, "send the audio as the 'file' field of a "
                              "multipart/form-data body", "bad_message", "file")
        fmt = field(request, "response_format", "json")
        if fmt not in FORMATS:
            return self.error(request, 400, "response_format %r is not supported (supported: "
                              "%s)" % (fmt[:30], ", ".join(FORMATS)), "bad_message",
                              "response_format")
        stream = field(request, "stream", "false").lower() == "true"
        if stream and fmt not in ("json", "text"):
            return self.error(request, 400, "stream=true answers as server-sent events: "
                              "response_format must be json or text", "bad_message",
                              "stream")
        granularities = [v.decode("utf-8", "replace")
                         for v in request.args.get(b"timestamp_granularities[]", [])]
        if [g for g in granularities if g not in GRANULARITIES]:
            return self.error(request, 400, "timestamp_granularities must be segment or word",
                              "bad_message", "timestamp_granularities")
        if granularities and fmt != "verbose_json":
            return self.error(request, 400, "timestamp_granularities needs response_format "
                              "verbose_json", "bad_message", "timestamp_granularities")
        language = field(request, "language") or None
        if language is not None and self.registry.model is not None:
            try:
                self.registry.model.check_language(language)
            except ValueError as e:
                return self.error(request, 400, str(e), "bad_message", "language")
        logprobs = b"logprobs" in request.args.get(b"include[]", [])
        try:
            keyterms = prompt_keyterms(field(request, "prompt"), [
                v.decode("utf-8", "replace") for v in request.args.get(b"keywords[]", [])])
        except ProtocolError as e:
            return self.error(request, 400, str(e), "bad_message", "keywords")
        audio = uploads.read_audio(self.reactor, io.BytesIO(files[-1]))
        if stream:
            self._stream(request, audio, keyterms, language)
        else:
            done = self.run(request, audio, keyterms=keyterms, language=language)
            done.addCallback(self._answer, request, fmt, granularities or ["segment"], logprobs)
        return NOT_DONE_YET

    def _answer(self, transcript, request, fmt, granularities, logprobs):
        if transcript is None or request.finished:
            return
        usage = {"type": "duration", "seconds": round(transcript.duration, 3)}
        if fmt == "json":
            body = {"text": transcript.text, "usage": usage}
            if logprobs:
                body["logprobs"] = [{"token": w["word"], "logprob": _logprob(w["confidence"]),
                                     "bytes": list(w["word"].encode("utf-8"))}
                                    for u in transcript.utterances for w in u["words"]]
            body = self.answer_json(request, body)
        elif fmt == "verbose_json":
            body = self.answer_json(request, verbose(transcript, granularities))
        else:
            text = {"text": lambda: transcript.text + "\n",
                    "srt": lambda: srt(transcript.utterances),
                    "vtt": lambda: vtt(transcript.utterances)}[fmt]()
            request.setHeader(b"content-type", b"text/vtt; charset=utf-8" if fmt == "vtt"
                              else b"text/plain; charset=utf-8")
            body = text.encode("utf-8")
        request.write(body)
        request.finish()

    def _stream(self, request, audio, keyterms, language):
        started = []

        def event(obj):
            if not started:
                started.append(True)
                request.setResponseCode(200)
                request.setHeader(b"content-type", b"text/event-stream")
                request.setHeader(b"cache-control", b"no-store")
            request.write(b"data: " + json.dumps(obj, ensure_ascii=False).encode("utf-8")
                          + b"\n\n")

        def text(delta):
            if not request.finished:
                event({"type": "transcript.text.delta", "delta": delta})

        def done(transcript):
            if transcript is None or request.finished:
                return
            event({"type": "transcript.text.done", "text": transcript.text,
                   "usage": {"type": "duration", "seconds": round(transcript.duration, 3)}})
            request.write(b"data: [DONE]\n\n")
            request.finish()

        # Errors before the first event are answered with a status; after it,
        # the stream can only end with an error event.
        def error(request_, status, message, kind, param=None):
            if not started:
                return self.error_body(request_, status, message, kind, param)
            return b"data: " + json.dumps({"error": {"message": message, "type": "server_error",
                                                     "param": param, "code": kind}}).encode(
                "utf-8") + b"\n\n"

        self.run(request, audio, on_text=text, error=error, keyterms=keyterms,
                 language=language).addCallback(done)
