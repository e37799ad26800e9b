"""
The HTTP port: the browser page, the stream WebSocket at ``/ws`` (the same
protocol as ``--ws-port``), ``/healthz`` and ``/readyz`` for probes, and
Prometheus metrics at ``/metrics``.
"""

import os

from autobahn.twisted.resource import WebSocketResource
from twisted.web import resource, server, static

from . import messages

#: The page's files, served at the root.
STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")


class _Probe(resource.Resource):
    """200 while ``check()`` holds, else 503; the body is the status message."""

    isLeaf = True

    def __init__(self, health, check):
        resource.Resource.__init__(self)
        self.health = health
        self.check = check

    def render_GET(self, request):
        request.setResponseCode(200 if self.check(self.health) else 503)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return messages.encode(self.health.status()) + b"\n"

    render_HEAD = render_GET


class _StreamWebSocketResource(WebSocketResource):
    """The stream WebSocket on an HTTP connection.

    The HTTP connection registered itself as its transport's producer; the
    WebSocket protocol that takes the connection over registers its own."""

    def render(self, request):
        transport = request.channel.transport
        if transport is not None and getattr(transport, "producer", None) is not None:
            transport.unregisterProducer()
        return WebSocketResource.render(self, request)


class _Site(server.Site):
    """No access log: probes and scrapes come every few seconds, and streams
    are logged by the registry."""

    def log(self, request):
        pass


class _Listen(resource.Resource):
    """``/v1/listen``: Deepgram's live WebSocket (GET) and its pre-recorded
    transcription (POST) share the path."""

    isLeaf = True

    def __init__(self, websocket, prerecorded):
        resource.Resource.__init__(self)
        self.websocket = websocket
        self.prerecorded = prerecorded

    def render(self, request):
        if request.method == b"POST":
            return self.prerecorded.render(request)
        return self.websocket.render(request)


def api_resources(sessions, reactor, realtime_factory, listen_factory, auth=None):
    """The ``/v1`` tree of other APIs' endpoints (parakeet.server.apis)."""
    from .apis.prerecorded import PrerecordedResource
    from .apis.transcriptions import TranscriptionsResource

    v1 = resource.Resource()
    v1.putChild(b"realtime", _StreamWebSocketResource(realtime_factory))
    audio = resource.Resource()
    audio.putChild(b"transcriptions", TranscriptionsResource(sessions, reactor, auth))
    v1.putChild(b"audio", audio)
    v1.putChild(b"listen", _Listen(_StreamWebSocketResource(listen_factory),
                                   PrerecordedResource(sessions, reactor, auth)))
    return v1


def http_site(health, websocket_factory, metrics_resource=None, apis=None):
    """The HTTP port's site; apis: the ``/v1`` tree, if served."""
    root = static.File(STATIC_DIR)
    root.putChild(b"healthz", _Probe(health, lambda h: h.loaded))
    root.putChild(b"readyz", _Probe(health, lambda h: h.ready))
    root.putChild(b"ws", _StreamWebSocketResource(websocket_factory))
    if metrics_resource is not None:
        root.putChild(b"metrics", metrics_resource)
    if apis is not None:
        root.putChild(b"v1", apis)
    site = _Site(root)
    site.displayTracebacks = False
    return site
