"""
Turns inside a stream: where utterances start and end, whether the speaker
is speaking, and each utterance's words with their times.

A :class:`TurnTracker` follows one stream on the reactor thread.  Each
decoding step hands it what the step produced (tokens with their pieces,
frames and confidences, NeMo's endpointing flag, and the voice activity of
the audio the step heard); it splits the step's tokens into parts at
utterance boundaries and says, for each part, the ``turn_detection`` and
``last_state`` a result carries, and the utterance a part ends.

An utterance starts with its first word and ends at the first of:

* the model's ``<EOU>`` token (models trained with one);
* NeMo's endpointing (``stop_history_eou``: that long without a token)
  while voice activity detection hears silence, or without a detector;
* a client's ``flush``;
* the end of the stream.
"""

import attr

from ..contract import LANGUAGE_TAG, WORD_START, piece_text

START = "start_of_utterance"
RUNNING = "running"
PAUSE = "pause"
END = "end_of_utterance"

SPEECH = "speech"
SILENCE = "silence"

#: Milliseconds of audio in each voice activity window (parakeet.engine.vad).
WINDOW_MS = 32

#: How far below the threshold a window's speech probability must fall to
#: count as silence (the usual Silero hysteresis).
HYSTERESIS = 0.15


@attr.s(frozen=True)
class TurnSettings:
    """Thresholds of turn detection (server flags)."""

    #: Speech probability at which a 32 ms window counts as speech.
    vad_threshold = attr.ib(default=0.5)
    #: Milliseconds below the threshold before the state turns to silence.
    min_silence_ms = attr.ib(default=300)
    #: Milliseconds of silence after speech at which the stream is finalized
    #: by the server; 0: never.
    finalize_silence_ms = attr.ib(default=0)


@attr.s(slots=True)
class Word:
    text = attr.ib()
    first_frame = attr.ib()
    last_frame = attr.ib()
    confidences = attr.ib(factory=list)


@attr.s(frozen=True, slots=True)
class Part:
    """A run of one step's tokens and the turn fields of its result."""

    token_ids = attr.ib()
    confidences = attr.ib()
    text = attr.ib()
    turn = attr.ib()  #: dict of turn_detection, last_state, maybe utterance


class TurnTracker:

    def __init__(self, settings, frame_ms, eou_id=None, vad=True, window_ms=WINDOW_MS):
        self.settings = settings
        self.frame_ms = frame_ms
        self.window_ms = window_ms
        self.eou_id = eou_id
        self.vad = vad
        self.last_state = None
        self.utterances = 0
        #: The language a multilingual model last tagged what it heard with.
        self.language = None
        self._words = None       # the open utterance's words, None between
        self._below_ms = 0.0     # ms of windows below the threshold, in a row
        self._heard_speech = False
        self._last_token_ms = 0.0
        self._audio_ms = 0.0
        self._sent = (PAUSE, None)  # (turn_detection, last_state) last said

    @property
    def in_utterance(self):
        return self._words is not None

    @property
    def silence_ms(self):
        """Milliseconds of silence at the end of what was decoded: heard by
        the detector, or, without one, with no token emitted."""
        if self.vad:
            return self._below_ms if self.last_state == SILENCE else 0.0
        return max(0.0, self._audio_ms - self._last_token_ms)

    @property
    def finalize_due(self):
        """Whether the server should finalize the stream for its silence."""
        limit = self.settings.finalize_silence_ms
        return bool(limit) and self._heard_speech and self.silence_ms >= limit

    # what a step decoded

    def step(self, result, pieces, audio_ms, is_last=False, always=False):
        """Parts of one step's result, in order; the last one ends the
        stream's open utterance when is_last.  Empty when nothing changed,
        unless always: then at least one."""
        if len(pieces) != len(result.token_ids):
            raise ValueError("a piece is needed for every token")
        self._audio_ms = audio_ms
        self._hear(result.speech)
        parts = []
        tokens, confidences, text = [], [], []

        def cut(turn):
            parts.append(Part(tokens[:], confidences[:], "".join(text), turn))
            del tokens[:], confidences[:], text[:]

        started = False
        for token, confidence, frame, piece in zip(
                result.token_ids, result.confidences, result.frames, pieces):
            tokens.append(token)
            confidences.append(confidence)
            if token == self.eou_id:
                if self.in_utterance:
                    cut(self._end("eou"))
                    started = False
                continue
            self._last_token_ms = (frame + 1) * self.frame_ms
            tag = LANGUAGE_TAG.match(piece)
            if tag:
                self.language = tag.group(1)
            added = piece_text(piece)
            if not added:
                continue
            text.append(added)
            if not self.in_utterance:
                if tokens[:-1]:
                    cut(self._turn())
                self._words = []
                started = self._heard_speech = True
            self._add(piece, frame, confidence)
        if self.in_utterance and (
                is_last or (result.endpoint and self.last_state != SPEECH)):
            cut(self._end("final" if is_last else "silence"))
        elif tokens or started or is_last or (always and not parts) or self._changed():
            cut(self._turn(START if started else None))
        return parts

    def flush(self):
        """The turn fields of a result that ends the open utterance now (an
        empty one if none is open)."""
        if not self.in_utterance:
            self._words = []
        return self._end("flush")

    # internals

    def _hear(self, speech):
        threshold = self.settings.vad_threshold
        for p in speech:
            if p >= threshold:
                self.last_state = SPEECH
                self._heard_speech = True
                self._below_ms = 0.0
            else:
                if self.last_state is None:
                    self.last_state = SILENCE
                if p < threshold - HYSTERESIS or self.last_state == SILENCE:
                    self._below_ms += self.window_ms
                if self._below_ms >= self.settings.min_silence_ms:
                    self.last_state = SILENCE

    def _add(self, piece, frame, confidence):
        words = self._words
        if piece.startswith(WORD_START) or not words:
            words.append(Word(piece.lstrip(WORD_START), frame, frame))
        else:
            words[-1].text += piece
            words[-1].last_frame = frame
        words[-1].confidences.append(confidence)

    def _detection(self):
        if self.in_utterance and self.last_state != SILENCE:
            return RUNNING
        return PAUSE

    def _changed(self):
        return self._sent != (self._detection(), self.last_state)

    def _turn(self, detection=None):
        detection = detection or self._detection()
        self._sent = (self._detection(), self.last_state)
        return {"turn_detection": detection, "last_state": self.last_state}

    def open_words(self):
        """The open utterance's words so far, as an utterance lists them
        (empty between utterances)."""
        return self._listed(self._words or ())

    def _listed(self, words):
        ms = self.frame_ms
        return [{
            "word": w.text,
            "start_ms": w.first_frame * ms,
            "end_ms": (w.last_frame + 1) * ms,
            "confidence": round(sum(w.confidences) / len(w.confidences), 4),
        } for w in words if w.text]

    def _end(self, reason):
        listed = self._listed(self._words)
        self._words = None
        utterance = {
            "index": self.utterances,
            "text": " ".join(w["word"] for w in listed),
            "start_ms": listed[0]["start_ms"] if listed else self._audio_ms,
            "end_ms": listed[-1]["end_ms"] if listed else self._audio_ms,
            "words": listed,
            "reason": reason,
        }
        if self.language is not None:
            utterance["language"] = self.language
        self.utterances += 1
        turn = self._turn(END)
        turn["utterance"] = utterance
        return turn
