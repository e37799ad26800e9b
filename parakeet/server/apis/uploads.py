"""
Whole files, transcribed as streams: an upload's audio is decoded off the
reactor thread, then fed to a :class:`~parakeet.server.protocol.StreamSession`
as fast as the decoder takes it (reading pauses on the session's backlog
like a client's socket would), in a slot like any live stream's.
"""

import io

import attr
import numpy as np
from twisted.internet import defer, threads

from ...audio import MAX_RATE, MIN_RATE, AudioError, decode_samples
from ..protocol import Channel

#: Seconds of audio handed to the session at a time.
PIECE_SECONDS = 1.0

#: Why a stream was refused, to an HTTP status.
REFUSED = {"full": 429, "draining": 503, "loading": 503}


class UploadError(Exception):
    """An upload could not be transcribed; str() says why, kind is what it is
    about (``metrics.ERROR_KINDS``) and status the HTTP status to answer with."""

    def __init__(self, message, kind, status=400, counted=False):
        Exception.__init__(self, message)
        self.kind = kind
        self.status = status
        #: Whether the session counted it in the metrics already.
        self.counted = counted


@attr.s(frozen=True)
class Transcript:
    text = attr.ib()
    #: The utterances, as results give them (``turns``' shape).
    utterances = attr.ib()
    #: Seconds of audio.
    duration = attr.ib()


def decode_file(content, raw=None):
    """(samples, rate): the mono float32 audio of an uploaded file (a file
    object), or of raw bytes in raw = (encoding, rate).  AudioError if it
    cannot be decoded."""
    data = content.read()
    if raw is not None:
        encoding, rate = raw
        return decode_samples(data, encoding), rate
    if not data:
        raise AudioError("the file is empty")
    import soundfile

    try:
        samples, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except Exception as e:
        raise AudioError("cannot decode the file's audio (%s): send WAV, FLAC, Ogg or MP3"
                         % (str(e)[:200],))
    samples = samples.mean(axis=1).astype(np.float32)
    if not MIN_RATE <= rate <= MAX_RATE:
        import soxr

        samples, rate = soxr.resample(samples, rate, 16000).astype(np.float32), 16000
    return samples, rate


def read_audio(reactor, content, raw=None):
    """decode_file in a thread: a Deferred of (samples, rate)."""
    return threads.deferToThreadPool(reactor, reactor.getThreadPool(), decode_file,
                                     content, raw)


class UploadChannel(Channel):
    """Feeds an upload's audio to its session and collects what it hears."""

    def __init__(self, clock, peer, on_text=None):
        self.clock = clock
        self.peer = peer
        self.on_text = on_text
        self.session = None
        self.done = defer.Deferred()
        self.utterances = []
        #: The transcript as the last result said it (written, with --itn).
        self.text = ""
        self._seen = 0
        self._paused = False
        self._failure = None
        self._samples = None
        self._at = 0

    def start(self, session, samples, rate, written=None, keyterms=(), language=None):
        self.session = session
        self._samples = samples
        session.connection_made(rate)
        if session.stream is not None:
            if written is not None:
                session.itn = written and session.loop.itn is not None
            if keyterms:
                session.set_keyterms(keyterms)
            if language is not None:
                session.set_language(language)
            self._feed()

    def _feed(self):
        session, samples = self.session, self._samples
        piece = int(PIECE_SECONDS * session.stream.input_rate)
        while self._at < len(samples) and not self._paused and session.connected:
            session.audio(samples[self._at:self._at + piece])
            self._at += piece
        if self._at >= len(samples) and session.connected and not session.stream.finishing:
            session.close_stream()

    def cancel(self):
        """The client went away."""
        if self.session is not None and self.session.connected:
            self.session.connection_lost()

    # what the session does

    def send(self, message):
        if message["type"] != "result":
            return
        if message.get("utterance") is not None:
            self.utterances.append(message["utterance"])
        self.text = message["text"]
        text = self.session.text
        delta, self._seen = text[self._seen:], len(text)
        if self.on_text is not None and delta.strip():
            self.on_text(delta if self._seen > len(delta) else delta.lstrip())

    def error(self, text, kind):
        if self._failure is None:
            self._failure = UploadError(text, kind, REFUSED.get(kind, 500), counted=True)

    def close(self):
        session = self.session
        if self._failure is not None:
            failure, self._failure = self._failure, None
            self.done.errback(failure)
        elif not self.done.called:
            self.done.callback(Transcript(self.text, self.utterances,
                                          session.stream.audio_seconds))

    def abort(self):
        self.close()

    def pause_reading(self, reason):
        self._paused = True

    def resume_reading(self, reason):
        if self._paused:
            self._paused = False
            self.clock.callLater(0, self._feed)


def transcribe(sessions, reactor, samples, rate, transport, peer, on_text=None,
               written=None, keyterms=(), language=None):
    """A Deferred of the Transcript of samples at rate, decoded in a stream
    slot like a live stream's; UploadError if it cannot be.  on_text: called
    with each piece of text as it is decoded (as spoken); written: whether
    utterances are written (with --itn), None: the server's default;
    keyterms: phrases to favour; language: the stream's (checked already).
    Returns (channel, Deferred): channel.cancel() ends the stream early."""
    limit = sessions.limits.max_stream_seconds
    if len(samples) > limit * rate:
        return None, defer.fail(UploadError(
            "the audio is %.1f s long; this server transcribes at most %g s "
            "(--max-stream-seconds)" % (len(samples) / rate, limit), "max_stream_seconds"))
    channel = UploadChannel(reactor, peer, on_text)
    session = sessions.session(channel, transport)
    channel.start(session, samples, rate, written, keyterms, language)
    return channel, channel.done
