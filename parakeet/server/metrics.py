"""
Prometheus metrics: what the server has done and what it holds now.

A :class:`ServerMetrics` owns a ``CollectorRegistry`` of its own, so that
several servers in one process (the tests) each count their own streams.
The registry, the decode loop and the sessions report to it through
``StreamRegistry.metrics``, which :meth:`ServerMetrics.attach` points at it;
until then they report to a :class:`~parakeet.server.registry.NoMetrics` that
counts nothing.

The hooks cost little where it matters: nothing is done per audio message.
Counters move when a stream opens, closes or is refused and when an error is
sent; the step metrics once per decode step, with the latencies of the
step's chunks observed together (:class:`BatchHistogram`).  What the server
holds now (streams, free slots, undecoded audio, the model) is read when
Prometheus scrapes, on the reactor thread like everything else that reads the
registry.
"""

import numpy as np
from prometheus_client import (
    CollectorRegistry, Counter, GCCollector, Histogram, PlatformCollector,
    ProcessCollector)
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import (
    GaugeMetricFamily, HistogramMetricFamily, InfoMetricFamily)
from prometheus_client.utils import floatToGoString
from twisted.web import resource

from .registry import NoMetrics

#: Seconds a decode step takes: a few ms for a small batch on a GPU, up to a
#: large batch of a large model on a CPU.
STEP_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5,
                0.75, 1.0, 1.5, 2.0)

#: Streams in one decode step.
BATCH_BUCKETS = tuple(2 ** i for i in range(11))  # 1 .. 1024

#: Seconds from a chunk's audio being all there to its result being sent.
LATENCY_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0,
                   3.0, 5.0, 10.0)

#: Weight of the newest step in the real-time factor's moving average.
RTF_SMOOTHING = 0.1

#: How streams come: the native protocol over TCP or a WebSocket, or
#: another API's (parakeet.server.apis): OpenAI's Realtime WebSocket and
#: audio transcriptions, Deepgram's live WebSocket and pre-recorded files.
TRANSPORTS = ("tcp", "websocket", "openai_realtime", "openai_file", "deepgram_live",
              "deepgram_file")

#: Why a stream is refused: the registry's own reasons.  Other code may
#: count others (``unauthorized``, ...) through ``refused``.
REFUSALS = ("full", "draining", "loading")

#: How streams end: ``Stream.end_reason`` as a label value.
END_REASONS = {
    "final": "final",              # audio with "final": true
    "close": "close",              # {"type": "close"}
    "disconnected": "disconnected",  # connection lost before the end
    "idle-timeout": "idle_timeout",
    "max-stream-seconds": "max_stream_seconds",
    "silence": "silence",          # --finalize-silence-ms
    "shutdown": "shutdown",        # finalized while the server drained
    "drain-timeout": "drain_timeout",  # still not decoded when draining ended
    "engine error": "engine_error",  # its decode step failed
}

#: What errors sent to clients are about.
ERROR_KINDS = (
    "bad_json",         # not UTF-8, not JSON, not an object
    "unknown_type",     # no 'type', or one the server does not know
    "bad_message",      # a field of the wrong type
    "bad_audio",        # bad base64, encoding or samples
    "bad_sample_rate",  # out of range, or changed after audio began
    "too_large",        # over --max-message-bytes
    "after_end",        # audio, flush or config after the end of the stream
    "full", "draining", "loading",  # refused on connecting
    "idle_timeout", "max_stream_seconds",
    "shutdown",         # the stream was finalized by the server shutting down
    "internal",         # decoding failed
)

def end_reason_label(reason):
    """A stream's end_reason as a label value."""
    if reason is None:
        return "unknown"
    label = END_REASONS.get(reason)
    if label is None:
        label = reason.replace("-", "_").replace(" ", "_")
    return label


class BatchHistogram:
    """A Prometheus histogram observed many values at a time, with numpy:
    one call per decode step however many streams the step served."""

    def __init__(self, name, documentation, buckets, registry):
        self.name = name
        self.documentation = documentation
        self.bounds = np.asarray(buckets, dtype=np.float64)
        self._labels = [floatToGoString(b) for b in buckets] + ["+Inf"]
        self.counts = np.zeros(len(buckets) + 1, dtype=np.int64)
        self.sum = 0.0
        registry.register(self)

    def observe_many(self, values):
        values = np.asarray(values, dtype=np.float64)
        if values.size:
            # Bucket i holds bounds[i-1] < v <= bounds[i]; the last, the rest.
            index = np.searchsorted(self.bounds, values, side="left")
            self.counts += np.bincount(index, minlength=len(self.counts))
            self.sum += float(values.sum())

    def collect(self):
        cumulative = np.cumsum(self.counts).tolist()
        yield HistogramMetricFamily(
            self.name, self.documentation,
            buckets=list(zip(self._labels, cumulative)), sum_value=self.sum)


class _Live:
    """The metrics read from the server when it is scraped."""

    def __init__(self, metrics):
        self.metrics = metrics

    def collect(self):
        m = self.metrics
        registry, engine, loop = m.registry, m.engine, m.loop
        active = capacity = free = 0
        backlog = 0.0
        draining = False
        if registry is not None:
            active, capacity, draining = len(registry), registry.capacity, registry.closed
            free = max(0, registry.free)
            geometry = registry.geometry
            if geometry is not None and active:
                backlog = sum(s.cutter.buffered_samples
                              for s in registry.in_turn()) / geometry.sample_rate
        yield GaugeMetricFamily("parakeet_streams_active", "Streams open now.", active)
        yield GaugeMetricFamily("parakeet_streams_capacity",
                                "Most concurrent streams (--max-num-streams).", capacity)
        yield GaugeMetricFamily("parakeet_streams_free",
                                "Streams that could be opened now.", free)
        yield GaugeMetricFamily(
            "parakeet_audio_backlog_seconds",
            "Audio received from open streams but not yet decoded, in seconds, "
            "all streams together.", backlog)
        yield GaugeMetricFamily("parakeet_draining",
                                "1 while the server is shutting down and takes no "
                                "new streams.", int(bool(draining)))
        yield GaugeMetricFamily("parakeet_model_loaded",
                                "1 once the model is loaded and streams are decoded.",
                                int(engine is not None))
        if loop is not None:
            yield GaugeMetricFamily("parakeet_decode_max_batch",
                                    "Most streams decoded in one step (--max-batch).",
                                    loop.max_batch)
        model = registry.model if registry is not None else None
        if model is not None:
            info = model.describe()
            yield InfoMetricFamily("parakeet_model", "The model served.", value={
                "model": info["name"], "device": info["device"], "precision": info["precision"],
                "chunk_sizes_ms": ",".join(map(str, info["chunk_sizes_ms"])),
                "languages": ",".join(info["languages"]), "language": info["language"],
            })
        if engine is not None:
            yield GaugeMetricFamily("parakeet_chunk_seconds",
                                    "Audio each stream advances by per decode step.",
                                    m.chunk_seconds)
        if m.rtf is not None:
            yield GaugeMetricFamily(
                "parakeet_real_time_factor",
                "Decode step seconds per second of chunk audio, a moving average over "
                "steps (weight %g for the newest); above 1 the streams of a step fall "
                "behind real time." % (RTF_SMOOTHING,), m.rtf)


class ServerMetrics(NoMetrics):
    """A server's Prometheus metrics, and the hooks that move them."""

    def __init__(self, process=True):
        """process: also export the process's CPU, memory and descriptors and
        Python's garbage collection."""
        self.prometheus = CollectorRegistry()
        self.registry = self.loop = self.engine = None
        self.chunk_seconds = None
        #: The real-time factor's moving average (None before the first step).
        self.rtf = None
        r = self.prometheus
        self._opened = Counter("parakeet_streams_opened", "Streams opened.",
                               ["transport"], registry=r)
        self._closed = Counter("parakeet_streams_closed",
                               "Streams closed, by how they ended.", ["reason"],
                               registry=r)
        self._refused = Counter("parakeet_streams_refused",
                                "Connections refused a stream, by why.", ["reason"],
                                registry=r)
        self._errors = Counter("parakeet_errors_sent", "Error messages sent to clients, "
                               "by kind.", ["kind"], registry=r)
        self._audio = Counter("parakeet_decoded_audio_seconds",
                              "Seconds of stream audio decoded, all streams together.",
                              registry=r)
        self._steps = Histogram("parakeet_decode_step_seconds",
                                "Seconds each decode step took, from its batch being "
                                "handed to the model thread to its results being back.",
                                buckets=STEP_BUCKETS, registry=r)
        self._batches = Histogram("parakeet_decode_batch_size",
                                  "Streams decoded in each step.",
                                  buckets=BATCH_BUCKETS, registry=r)
        self._latency = BatchHistogram(
            "parakeet_result_latency_seconds",
            "Seconds from the audio of a chunk being all there (the arrival of the "
            "message that completed it) to its decoded result being sent, per chunk.",
            LATENCY_BUCKETS, r)
        # The known label values show from the first scrape on, at zero.
        self._closed_by = {}
        for transport in TRANSPORTS:
            self._opened.labels(transport)
        for reason in END_REASONS.values():
            self._closed_label(reason)
        for reason in REFUSALS:
            self._refused.labels(reason)
        for kind in ERROR_KINDS:
            self._errors.labels(kind)
        r.register(_Live(self))
        if process:
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
            GCCollector(registry=r)

    def attach(self, registry, loop=None, engine=None):
        """Count what registry's streams and the decode loop do; loop and
        engine once the model is loaded.  Call it with the registry alone as
        soon as it exists (to count refusals while the model loads), and again
        with all three once the model is loaded."""
        self.registry = registry
        registry.metrics = self
        if loop is not None:
            self.loop = loop
        if engine is not None:
            self.engine = engine
            self.chunk_seconds = engine.geometry.chunk_seconds

    def resource(self):
        """A twisted.web resource serving the metrics to Prometheus."""
        return MetricsResource(self.prometheus)

    # hooks

    def opened(self, stream):
        self._opened.labels(stream.transport).inc()

    def closed(self, stream):
        self._closed_label(end_reason_label(stream.end_reason)).inc()

    def _closed_label(self, label):
        counter = self._closed_by.get(label)
        if counter is None:
            counter = self._closed_by[label] = self._closed.labels(label)
        return counter

    def refused(self, reason):
        """A connection was refused a stream, for reason: a short word, the
        same each time (``full``, ``draining``, ``unauthorized``, ...)."""
        self._refused.labels(reason).inc()

    def error_sent(self, kind):
        """An error message of kind (one of ERROR_KINDS) went to a client."""
        self._errors.labels(kind).inc()

    def decoded(self, batch, seconds, audio_seconds, ready, now):
        """A decode step of batch streams took seconds and decoded
        audio_seconds of their audio; ready: when each of its chunks had all
        its audio, and now: when the results were sent (reactor seconds)."""
        self._steps.observe(seconds)
        self._batches.observe(batch)
        if audio_seconds > 0:
            self._audio.inc(audio_seconds)
        self._latency.observe_many(now - np.asarray(ready, dtype=np.float64))
        if self.chunk_seconds:
            rtf = seconds / self.chunk_seconds
            self.rtf = rtf if self.rtf is None else self.rtf + RTF_SMOOTHING * (rtf - self.rtf)


class MetricsResource(resource.Resource):
    """Prometheus's text format (or OpenMetrics, when the scraper asks for
    it) for one registry.

    Rendered on the reactor thread, unlike ``prometheus_client.twisted``'s
    resource, which runs on the reactor's thread pool: what is read at
    scrape time is only safe to read from the thread that changes it."""

    isLeaf = True

    def __init__(self, registry):
        resource.Resource.__init__(self)
        self.registry = registry

    def render_GET(self, request):
        accept = request.getHeader(b"accept")
        encoder, content_type = choose_encoder(accept.decode("latin-1") if accept else "")
        body = encoder(self.registry)
        request.setHeader(b"content-type", content_type.encode("ascii"))
        request.setHeader(b"cache-control", b"no-store")
        return body
