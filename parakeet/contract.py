"""
What passes between the server and the engine, with no torch and no reactor:
the chunk geometry of a served model, the chunks of audio the model thread
decodes (:class:`Chunk`), what one decoding step returns for a stream
(:class:`StepResult`), and the text of a token (:func:`piece_text`).

How a live stream is cut into the encoder's chunks, exactly:

A cache-aware model is trained on log-mel frames computed over whole
utterances.  Frame ``j`` is computed from the samples
``[j*hop - pad, j*hop - pad + n_fft)``, with ``pad`` zeros added before the
first sample and after the last, and an utterance of ``n`` samples has
``(n + 2*pad - n_fft) // hop`` valid frames.  The encoder consumes those frames
in chunks: a short first chunk with no pre-encode cache, then regular chunks
that carry the last few frames of the previous chunk as that cache.

NeMo 3.0's serving pipeline computes the mel frames of each chunk from that
chunk's audio plus 10 ms of look-back, so the first and last frames of every
chunk see zero padding instead of their neighbours' samples, and it pads the
first chunk to the regular size, which shifts the whole chunk grid.  Both make
its output differ from the model's offline output from the first token on.
:class:`ChunkCutter` hands the model thread segments of audio that contain
everything the next chunk's frames need (and nothing padded that should not
be), on the chunk grid the model was built for, so that streaming decodes
exactly what offline decoding of the same audio would.

Both sides cut with :class:`ChunkCutter`: the server, per stream, on the
reactor thread; the engine, for offline decoding and warm-up, so that both
decode the same chunks.  This module needs only numpy and attrs.
"""

import re

import attr
import numpy as np


@attr.s(frozen=True)
class ChunkGeometry:
    """The model-dependent arithmetic of frames, chunks and samples."""

    hop = attr.ib()            #: samples between frames
    n_fft = attr.ib()          #: samples a frame spans
    pad = attr.ib()            #: zeros the featurizer adds at both ends
    first_frames = attr.ib()   #: frames in the first chunk
    chunk_frames = attr.ib()   #: frames in every later chunk
    cache_frames = attr.ib()   #: frames of pre-encode cache before a later chunk
    sample_rate = attr.ib()

    @property
    def margin(self):
        """Samples of look-back a segment starts with: more than ``pad``, on the frame grid.

        Strictly more than ``pad`` keeps the segment's first sample (which the
        featurizer's pre-emphasis cannot see the predecessor of) out of every
        frame that is used.
        """
        return (self.pad // self.hop + 1) * self.hop

    @property
    def chunk_seconds(self):
        return self.chunk_frames * self.hop / self.sample_rate

    def frames_for(self, n_samples):
        """Valid frames of a finished utterance of n_samples."""
        return max(0, (n_samples + 2 * self.pad - self.n_fft) // self.hop)

    def frames_in_chunk(self, frames_done):
        return self.first_frames if frames_done == 0 else self.chunk_frames

    def segment_length(self, n_frames):
        return self.margin + (n_frames - 1) * self.hop - self.pad + self.n_fft

    def samples_needed(self, frames_done):
        """Samples the stream must have received to cut its next full chunk."""
        return self.samples_needed_through(frames_done + self.frames_in_chunk(frames_done))

    def samples_needed_through(self, frames):
        """Samples the first ``frames`` frames span."""
        return (frames - 1) * self.hop - self.pad + self.n_fft


@attr.s(frozen=True, slots=True)
class Chunk:
    """One chunk of one stream, ready for the model thread."""

    stream_id = attr.ib()
    samples = attr.ib(repr=False)  #: float32 segment, segment_length(n_frames) long
    valid_samples = attr.ib()      #: samples of the segment that are audio, not padding
    n_frames = attr.ib()           #: frames the chunk spans on the grid
    valid_frames = attr.ib()       #: frames that are audio (less than n_frames only when last)
    is_first = attr.ib()
    is_last = attr.ib()
    #: Samples of the stream, from its first, that had to arrive before this
    #: chunk could be decoded: the audio its result covers.
    audio_samples = attr.ib()
    #: Phrases the stream's decoding favours from this chunk on: always given
    #: with the first chunk, later only when they changed (None: unchanged).
    keyterms = attr.ib(default=None)
    #: A multilingual model's language for the stream from this chunk on:
    #: given with the first chunk and when it changed (None: unchanged, or
    #: the model's default).
    language = attr.ib(default=None)


class ChunkCutter:
    """Per-stream audio buffer that yields :class:`Chunk` on the model's grid."""

    def __init__(self, stream_id, geometry):
        self.stream_id = stream_id
        self.geometry = geometry
        # Samples before the stream's first one are the featurizer's zeros.
        self._buf = np.zeros(geometry.margin, dtype=np.float32)
        self._buf_start = -geometry.margin  # stream index of _buf[0]
        self._pending = []
        self._keyterms = ()
        self._keyterms_changed = False
        self._language = None
        self._language_changed = False
        self.received = 0
        self.frames_done = 0
        self.finished = False
        self.done = False

    @property
    def keyterms(self):
        """Phrases to favour; set at any time, they go with the next chunk."""
        return self._keyterms

    @keyterms.setter
    def keyterms(self, phrases):
        self._keyterms = tuple(phrases)
        self._keyterms_changed = True

    @property
    def language(self):
        """The stream's language (None: the model's default); set at any
        time, it goes with the next chunk."""
        return self._language

    @language.setter
    def language(self, code):
        self._language = code
        self._language_changed = True

    @property
    def buffered_samples(self):
        """Samples received but not yet handed to the model."""
        return self.received - max(0, self.frames_done * self.geometry.hop)

    @property
    def ready(self):
        """Whether :meth:`next_chunk` would return a chunk now."""
        return not self.done and (
            self.finished or self.received >= self.geometry.samples_needed(self.frames_done))

    def push(self, samples):
        if self.finished:
            raise ValueError("audio after the end of the stream")
        if len(samples):
            self._pending.append(np.asarray(samples, dtype=np.float32))
            self.received += len(samples)

    def pad_to_chunk(self):
        """Complete the chunk being filled with silence, so that every sample
        received so far is decoded without waiting for more audio.  Returns
        the samples (padding included) the stream needs for that: decoding
        is done once a chunk whose ``audio_samples`` reach it is decoded."""
        if self.finished:
            raise ValueError("the stream has ended")
        g = self.geometry
        frames = self.frames_done
        covered = g.samples_needed_through(frames) if frames else 0
        while self.received > covered:
            frames += g.frames_in_chunk(frames)
            covered = g.samples_needed_through(frames)
        if covered > self.received:
            self.push(np.zeros(covered - self.received, dtype=np.float32))
        return covered

    def finish(self):
        """No more audio will come: the rest is cut into the last chunk(s)."""
        self.finished = True

    def _flush_pending(self):
        if self._pending:
            self._buf = np.concatenate([self._buf] + self._pending)
            self._pending = []

    def _segment(self, n_frames):
        g = self.geometry
        start = self.frames_done * g.hop - g.margin
        length = g.segment_length(n_frames)
        self._flush_pending()
        offset = start - self._buf_start
        segment = self._buf[offset:offset + length]
        if len(segment) < length:
            segment = np.concatenate(
                [segment, np.zeros(length - len(segment), dtype=np.float32)])
        valid = min(length, self.received - start)
        return segment, valid

    def _advance(self, frames):
        g = self.geometry
        self.frames_done += frames
        keep_from = self.frames_done * g.hop - g.margin
        drop = keep_from - self._buf_start
        if drop > 0:
            self._flush_pending()
            self._buf = self._buf[drop:]
            self._buf_start = keep_from

    def next_chunk(self):
        """The next chunk if its audio is all here, else None."""
        if self.done:
            return None
        g = self.geometry
        n = g.frames_in_chunk(self.frames_done)
        needed = g.samples_needed(self.frames_done)
        if not self.finished:
            if self.received < needed:
                return None
            valid_frames, is_last = n, False
        else:
            remaining = g.frames_for(self.received) - self.frames_done
            valid_frames, is_last = min(n, remaining), remaining <= n
            if is_last:
                needed = self.received
        segment, valid = self._segment(n)
        first = self.frames_done == 0
        chunk = Chunk(self.stream_id, segment, valid, n, valid_frames,
                      first, is_last, min(needed, self.received),
                      self._keyterms if first or self._keyterms_changed else None,
                      self._language if first or self._language_changed else None)
        self._keyterms_changed = self._language_changed = False
        self._advance(valid_frames if is_last else n)
        if is_last:
            self.done = True
            self._buf = self._buf[:0]
        return chunk


#: The end-of-utterance token of the small model and the demo model.
EOU = "<EOU>"


@attr.s(frozen=True, slots=True)
class StepResult:
    """What one step decoded for one stream: the tokens it newly emitted."""

    stream_id = attr.ib()
    token_ids = attr.ib()
    confidences = attr.ib()
    text = attr.ib()  #: the text those tokens add to the transcript
    is_last = attr.ib()
    #: Encoder frame (from the stream's start) at which each token came.
    frames = attr.ib(factory=list)
    #: Speech probability of each 32 ms window of audio the step heard
    #: (empty without voice activity detection).
    speech = attr.ib(factory=list)
    #: NeMo's endpointing found an end of utterance (blank output).
    endpoint = attr.ib(default=False)
    #: The tokenizer's piece of each token.
    pieces = attr.ib(factory=list)


WORD_START = "\u2581"
_CONTROL_PIECE = re.compile(r"^<[^<>]+>$")


#: A multilingual model's language tag, written after what it heard in
#: that language (``<de-DE>``).
LANGUAGE_TAG = re.compile(r"^<([a-z]{2}-[A-Z]{2})>$")


def piece_text(piece):
    """What a tokenizer piece adds to a transcript: its text, a space where
    a word starts, nothing for a control token such as ``<EOU>``."""
    if _CONTROL_PIECE.match(piece):
        return ""
    return piece.replace(WORD_START, " ")
