"""
Deepgram's pre-recorded transcription: ``POST /v1/listen`` with the audio as
the request's body (a file, or raw audio described by ``encoding`` and
``sample_rate`` in the query).  A JSON body naming a URL is refused: the
server fetches nothing.
"""

import hashlib
import io
import json
import uuid

from twisted.internet import threads
from twisted.web.server import NOT_DONE_YET

from . import deepgram, uploads
from .httpapi import UploadResource

#: Deepgram's err_code, by what an error is about.
_CODES = {"unauthorized": "INVALID_AUTH", "full": "TOO_MANY_REQUESTS",
          "draining": "SERVICE_UNAVAILABLE", "loading": "SERVICE_UNAVAILABLE",
          "internal": "INTERNAL_SERVER_ERROR"}


def _read(content, raw):
    data = content.read()
    samples, rate = uploads.decode_file(io.BytesIO(data), raw)
    return samples, rate, hashlib.sha256(data).digest()


class PrerecordedResource(UploadResource):

    transport = "deepgram_file"

    def error_body(self, request, status, message, kind, param=None):
        return self.answer_json(request, deepgram.error_body(
            message, _CODES.get(kind, "Bad Request")), status)

    def render_POST(self, request):
        refused = self.refuse(request)
        if refused is not None:
            return refused
        ctype = (request.getHeader(b"content-type") or b"").decode("latin-1").lower()
        if ctype.startswith("application/json"):
            return self._url(request)
        try:
            options = deepgram.options(request.args)
            deepgram.check_language(options, self.registry.model)
        except deepgram.OptionError as e:
            return self.error(request, 400, str(e), "bad_message")
        raw = (options.encoding, options.sample_rate) if options.encoding else None
        sha = []

        def read(content):
            samples, rate, digest = _read(content, raw)
            sha.append(digest.hex())
            return samples, rate

        audio = threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), read,
                                          request.content)
        self.run(request, audio, written=options.written, keyterms=options.keyterms,
                 language=options.language).addCallback(
            self._answer, request, options, sha)
        return NOT_DONE_YET

    def _url(self, request):
        # Read on the reactor: a JSON body is small (twisted.web holds it in memory).
        try:
            body = json.loads(request.content.read(1 << 16) or b"{}")
        except ValueError:
            body = None
        if isinstance(body, dict) and "url" in body:
            message = ("this server does not fetch audio from URLs: send the audio itself "
                       "as the request body")
        else:
            message = "send the audio as the request body (a JSON body may only name a URL)"
        return self.error(request, 400, message, "bad_message")

    def _answer(self, transcript, request, options, sha):
        if transcript is None or request.finished:
            return
        said = [u for u in transcript.utterances if u["words"]]
        everything = deepgram.alternative([w for u in said for w in u["words"]])
        meta = deepgram.metadata(str(uuid.uuid4()), self.registry.model.name,
                                 transcript.duration)
        meta["sha256"] = sha[0]
        results = {"channels": [{"alternatives": [everything]}]}
        if options.utterances:
            results["utterances"] = [dict(
                deepgram.alternative(u["words"]), start=u["start_ms"] / 1000.0,
                end=u["end_ms"] / 1000.0, channel=0, id=str(uuid.uuid4())) for u in said]
        request.write(self.answer_json(request, {"metadata": meta, "results": results}))
        request.finish()
