"""
The streams the server holds, shared by every transport.
"""

from collections import OrderedDict

import attr
from twisted.logger import Logger

from ..audio import Resampler
from ..contract import ChunkCutter


@attr.s(frozen=True)
class ModelInfo:
    """What the server serves, as each ``hello``, the status port and
    ``/metrics`` tell it."""

    name = attr.ib()        #: the model's served name (``demo``, a Hugging Face id, a file)
    device = attr.ib()
    precision = attr.ib()
    chunk_ms = attr.ib()    #: audio a stream advances by each step
    chunk_sizes_ms = attr.ib(converter=tuple)  #: the chunk lengths the model was trained for
    sample_rate = attr.ib()
    #: The language codes a multilingual model takes; empty: English only.
    languages = attr.ib(converter=tuple, default=())
    #: The language of streams that choose none (None: English only).
    language = attr.ib(default=None)

    def describe(self):
        """As JSON: ``name``, ``device``, ``precision``, ``chunk_ms``,
        ``chunk_sizes_ms``, ``sample_rate``, ``languages`` (``["en"]`` for
        a model of English only) and ``language``."""
        return {"name": self.name, "device": self.device, "precision": self.precision,
                "chunk_ms": self.chunk_ms, "chunk_sizes_ms": list(self.chunk_sizes_ms),
                "sample_rate": self.sample_rate,
                "languages": list(self.languages) or ["en"],
                "language": self.language or "en"}

    def check_language(self, code):
        """The model's name for a stream's language code, matched without
        regard to case; ValueError naming what the model takes if it takes
        no such language.  A model of English only takes English codes."""
        if not isinstance(code, str) or not 0 < len(code) <= 40:
            raise ValueError("a language must be a code such as \"en\" or \"de-DE\"")
        if not self.languages:
            if code.lower() == "en" or code.lower().startswith("en-"):
                return code
            raise ValueError("language %r: this server's model transcribes English only"
                             % (code,))
        for known in self.languages:
            if known.lower() == code.lower():
                return known
        raise ValueError("language %r: this server's model takes %s"
                         % (code, ", ".join(self.languages)))


class RegistryFull(Exception):
    """Every streaming state is taken."""


class RegistryClosed(Exception):
    """The server is shutting down: it takes no new streams."""


@attr.s(eq=False)
class Stream:
    """One client's stream: its audio on the model's chunk grid, how much of
    it is decoded, and since when its next chunk has been waiting."""

    id = attr.ib()
    peer = attr.ib()
    transport = attr.ib()          #: "tcp" or "websocket"
    listener = attr.ib(repr=False)  #: gets stream_result(stream, result)
    cutter = attr.ib(repr=False)
    input_rate = attr.ib()
    opened_at = attr.ib()
    clock = attr.ib(repr=False)
    resampler = attr.ib(default=None, repr=False)
    received = attr.ib(default=0)   #: samples received, at the input rate
    #: Model-rate samples decoded so far (the decode loop's to write).
    decoded_samples = attr.ib(default=0)
    end_reason = attr.ib(default=None)  #: why it is finishing, once it is
    #: Model-rate samples each pending flush waits for (``decoded_samples``).
    flushes = attr.ib(factory=list, repr=False)
    #: When the chunk it waits to have decoded had all its audio (clock
    #: seconds); None while it has no chunk ready.  Written here only: when
    #: audio completes a chunk, and when the decode loop takes one.
    ready_at = attr.ib(default=None, repr=False)

    @property
    def finishing(self):
        return self.end_reason is not None

    @property
    def audio_seconds(self):
        return self.received / self.input_rate

    @property
    def audio_ms(self):
        """Milliseconds of audio, from the stream's start, decoded so far."""
        return round(self.decoded_samples * 1000 / self.cutter.geometry.sample_rate, 3)

    def set_input_rate(self, rate):
        """The client's audio comes at rate (before any audio has)."""
        self.input_rate = rate
        self.resampler = None
        if rate != self.cutter.geometry.sample_rate:
            self.resampler = Resampler(rate, self.cutter.geometry.sample_rate)

    def flush(self):
        """Have everything received so far decoded without waiting for more
        audio: silence completes the chunk being filled."""
        if self.resampler is not None:
            # What the converter holds back is let out, and a new one starts.
            self.cutter.push(self.resampler.flush())
            self.set_input_rate(self.input_rate)
        self.flushes.append(self.cutter.pad_to_chunk())
        self._note_ready()

    def push(self, samples):
        self.received += len(samples)
        if self.resampler is not None:
            samples = self.resampler(samples)
        self.cutter.push(samples)
        self._note_ready()

    def finish(self, reason):
        """No more audio: what was received is decoded to the end."""
        if self.finishing:
            return
        self.end_reason = reason
        if self.resampler is not None:
            self.cutter.push(self.resampler.flush())
        self.cutter.finish()
        self._note_ready()

    def _note_ready(self):
        """A result's latency counts from when its chunk had all its audio."""
        if self.ready_at is None and self.cutter.ready:
            self.ready_at = self.clock.seconds()

    def chunk_taken(self, now):
        """The decode loop took the next chunk at now: returns when that
        chunk had all its audio.  A chunk after it whose audio is already
        there (sent faster than it is decoded) waits from now on."""
        ready = now if self.ready_at is None else self.ready_at
        self.ready_at = now if self.cutter.ready else None
        return ready


class RegistryLoading(Exception):
    """The model is not loaded yet: no stream can be decoded."""


class NoMetrics:
    """What the registry, the decode loop and the sessions tell
    ``StreamRegistry.metrics``; this one counts nothing
    (:class:`parakeet.server.metrics.ServerMetrics` does)."""

    def opened(self, stream):
        """stream was opened."""

    def closed(self, stream):
        """stream was released; its end_reason says how it ended."""

    def refused(self, reason):
        """A connection was refused a stream, for reason (a fixed word:
        ``full``, ``draining``, ``loading``, ``unauthorized``, ...)."""

    def error_sent(self, kind):
        """An error message was sent to a client; kind: a fixed word
        (``ERROR_KINDS`` in :mod:`parakeet.server.metrics`)."""

    def decoded(self, batch, seconds, audio_seconds, ready, now):
        """A decode step of batch streams took seconds and decoded
        audio_seconds of audio; ready: when each chunk's audio was all there,
        now: when the results were sent."""


class StreamRegistry:
    """Streams by id, up to a capacity; ordered so every stream gets its turn."""

    log = Logger()

    def __init__(self, capacity, geometry, input_rate, clock):
        self.capacity = capacity
        self.geometry = geometry
        self.input_rate = input_rate
        self.clock = clock
        #: The :class:`ModelInfo` of the model served, once it is loaded.
        self.model = None
        self._streams = OrderedDict()
        self._next_id = 1
        self.opened = 0
        self.closed = False
        #: Told about streams opening, closing and being refused, decode
        #: steps and errors sent to clients.
        self.metrics = NoMetrics()

    def __len__(self):
        return len(self._streams)

    def __contains__(self, stream):
        return self._streams.get(stream.id) is stream

    def get(self, stream_id):
        return self._streams.get(stream_id)

    @property
    def free(self):
        return self.capacity - len(self._streams)

    def open(self, peer, transport, listener):
        if self.geometry is None:
            self.metrics.refused("loading")
            raise RegistryLoading()
        if self.closed:
            self.metrics.refused("draining")
            raise RegistryClosed()
        if len(self._streams) >= self.capacity:
            self.metrics.refused("full")
            raise RegistryFull()
        stream_id = self._next_id
        self._next_id += 1
        stream = Stream(stream_id, peer, transport, listener,
                        ChunkCutter(stream_id, self.geometry), self.input_rate,
                        self.clock.seconds(), self.clock)
        stream.set_input_rate(self.input_rate)
        self._streams[stream_id] = stream
        self.opened += 1
        self.metrics.opened(stream)
        self.log.info("stream {stream_id} opened by {peer} over {transport}",
                      stream_id=stream_id, peer=peer, transport=transport)
        return stream

    def release(self, stream):
        if self._streams.pop(stream.id, None) is None:
            return
        self.metrics.closed(stream)
        self.log.info(
            "stream {stream_id} closed ({reason}) for {peer}: {audio_seconds:.2f} s "
            "of audio in {duration:.2f} s",
            stream_id=stream.id, reason=stream.end_reason, peer=stream.peer,
            audio_seconds=stream.audio_seconds,
            duration=self.clock.seconds() - stream.opened_at)

    def in_turn(self):
        """Streams, least recently served first."""
        return list(self._streams.values())

    def served(self, stream):
        """Send stream to the back of the queue."""
        if stream.id in self._streams:
            self._streams.move_to_end(stream.id)
