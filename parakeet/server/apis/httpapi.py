"""
What the HTTP endpoints of other APIs share: a request's header fields,
authentication, JSON answers, and running an upload through the engine
until the request is answered or its client goes away.
"""

import json

from twisted.logger import Logger
from twisted.web import resource

from ..auth import api_refusal
from . import uploads

log = Logger()


def header_fields(request):
    """A request's header fields, names in lower case, last value of each."""
    return {name.decode("latin-1").lower(): values[-1].decode("latin-1")
            for name, values in request.requestHeaders.getAllRawHeaders()}


def field(request, name, default=None):
    """A form or query field's last value, as text."""
    values = request.args.get(name.encode("ascii"))
    if not values:
        return default
    return values[-1].decode("utf-8", "replace")


class UploadResource(resource.Resource):
    """A POST endpoint that transcribes the file it is sent; subclasses say
    how the API's requests, answers and errors look."""

    isLeaf = True
    #: The metrics' transport label of its streams.
    transport = None

    def __init__(self, sessions, reactor, auth=None):
        resource.Resource.__init__(self)
        self.sessions = sessions
        self.reactor = reactor
        self.auth = auth

    @property
    def registry(self):
        return self.sessions.registry

    def render_GET(self, request):
        request.setHeader(b"allow", b"POST")
        return self.error(request, 405, "use POST", "bad_message")

    def error_body(self, request, status, message, kind, param=None):
        """Answer with the API's error shape; returns the body.  param: the
        field the error is about, where the API says so."""
        raise NotImplementedError

    def error(self, request, status, message, kind, param=None):
        """error_body, counted in the metrics as an error sent of kind."""
        self.registry.metrics.error_sent(kind)
        return self.error_body(request, status, message, kind, param)

    def answer_json(self, request, obj, status=200):
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return json.dumps(obj, ensure_ascii=False).encode("utf-8")

    def refuse(self, request):
        """The body of a refusal if the request presents no valid token, else None."""
        refusal = api_refusal(self.auth, header_fields(request))
        if refusal is None:
            return None
        self.registry.metrics.refused("unauthorized")
        return self.error(request, 401, refusal.message, "unauthorized")

    def run(self, request, audio, on_text=None, error=None, written=None, keyterms=(),
            language=None):
        """Transcribe audio (a Deferred of (samples, rate)); a Deferred of
        the Transcript, or of None once the request was answered with an
        error (by error, self.error_body unless given) or its client went away."""
        error = error or self.error_body
        gone = []
        channels = []

        def lost(reason):
            gone.append(True)
            for channel in channels:
                channel.cancel()

        request.notifyFinish().addErrback(lost)

        def decoded(found):
            samples, rate = found
            if gone:
                return None
            channel, done = uploads.transcribe(
                self.sessions, self.reactor, samples, rate, self.transport,
                request.getClientAddress().host if request.getClientAddress() else "unknown",
                on_text, written, keyterms, language)
            if channel is not None:
                channels.append(channel)
            return done

        def failed(failure):
            if gone:
                return None
            problem = failure.value
            if isinstance(problem, uploads.UploadError):
                kind, status = problem.kind, problem.status
            elif isinstance(problem, ValueError):  # AudioError
                kind, status = getattr(problem, "kind", "bad_audio"), 400
            else:
                kind, status = "internal", 500
                log.failure("transcribing an upload", failure)
            if status == 429:
                request.setHeader(b"retry-after", b"1")
            if not getattr(problem, "counted", False):
                self.registry.metrics.error_sent(kind)
            body = error(request, status, str(problem), kind)
            if not request.finished:
                request.write(body)
                request.finish()
            return None

        audio.addCallback(decoded)
        audio.addErrback(failed)
        return audio

