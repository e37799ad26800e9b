"""
The stream protocol of the server guide, independent of the transport.

A :class:`StreamSession` lives as long as one client connection.  The
transport hands it each complete message (a TCP line or a WebSocket message)
and tells it when the connection is lost; the session answers through a
:class:`Channel`, which the transport implements.
"""

import attr
from twisted.logger import Logger

from . import messages
from ..audio import AudioError, decode_samples
from .registry import RegistryClosed, RegistryFull, RegistryLoading
from .turns import TurnSettings, TurnTracker


class Channel:
    """What a session needs from its transport (an interface, by convention)."""

    peer = "unknown"

    def send(self, message):
        """Send one message dict to the client."""
        raise NotImplementedError

    def close(self):
        """Close the connection once what was sent has been written."""
        raise NotImplementedError

    def abort(self):
        """Drop the connection now, whatever is still unsent."""
        raise NotImplementedError

    def pause_reading(self, reason):
        """Stop reading from the client until resume_reading(reason)."""
        raise NotImplementedError

    def resume_reading(self, reason):
        raise NotImplementedError

    def error(self, text, kind):
        """Tell the client what was wrong; kind: a fixed word saying what it
        is about (``metrics.ERROR_KINDS``), for channels that speak another
        API's error shapes."""
        self.send(messages.error(text))


#: Why reading from a client is paused while its undecoded audio piles up.
BACKLOG = "backlog"


@attr.s(frozen=True)
class Limits:
    """What a client may send, how long the server waits for it, and how its
    turns are found."""

    max_stream_seconds = attr.ib(default=300.0)
    max_message_bytes = attr.ib(default=1 << 20)
    #: Seconds without any message before a stream is finalized; 0: never.
    idle_timeout = attr.ib(default=60.0)
    #: Seconds of received but undecoded audio at which reading from the
    #: client pauses until the decoder catches up.
    max_backlog_seconds = attr.ib(default=10.0)
    #: Seconds a client may leave the server's messages unread (its socket
    #: full) before its connection is dropped; 0: never.
    write_timeout = attr.ib(default=30.0)
    turns = attr.ib(factory=TurnSettings)
    #: Phrases every stream's decoding favours (--keyterms).
    keyterms = attr.ib(default=())


class StreamSession:

    log = Logger()

    def __init__(self, registry, loop, limits, channel, transport):
        self.registry = registry
        self.loop = loop
        self.limits = limits
        self.channel = channel
        self.transport = transport
        self.stream = None
        self.turns = None
        #: The stream's transcript so far.
        self.text = ""
        #: How JSON audio that names no encoding is encoded, and binary audio.
        self.encoding = self.binary_encoding = "pcm16"
        #: A result after every decoded chunk, not only when there is news.
        self.every_chunk = False
        #: Whether ended utterances are sent in their written form (--itn).
        self.itn = False
        #: Results in the order they are sent, waiting while an earlier
        #: utterance's written form is being found.
        self._outbox = []
        self._writing = False
        self._close_when_sent = False
        #: The transcript as sent: written up to the last ended utterance,
        #: which ends at self.text[:self._spoken_done].
        self._written = ""
        self._spoken_done = 0
        self.connected = False
        self._idle = None
        self._unread = None
        self._backlogged = False
        #: Undecoded samples at which reading from the client pauses (known
        #: once the stream is open: the model's rate).
        self._max_backlog = None

    # transport events

    def connection_made(self, sample_rate=None, encoding=None):
        """sample_rate: the client's, if it declared one on connecting (a
        WebSocket URL's query); encoding: its binary messages', likewise."""
        self.connected = True
        try:
            self.stream = self.registry.open(self.channel.peer, self.transport, self)
        except RegistryFull:
            self.log.info("refused {peer} over {transport}: all {capacity} streams "
                          "in use", peer=self.channel.peer, transport=self.transport,
                          capacity=self.registry.capacity)
            self.send_error(messages.NO_FREE_STATE, "full")
            self.channel.close()
            return
        except RegistryClosed:
            self.send_error(messages.SHUTTING_DOWN, "draining")
            self.channel.close()
            return
        except RegistryLoading:
            self.send_error(messages.LOADING, "loading")
            self.channel.close()
            return
        self._max_backlog = self.limits.max_backlog_seconds * self.registry.geometry.sample_rate
        if sample_rate is not None:
            self.stream.set_input_rate(sample_rate)
        self.binary_encoding = encoding or self.binary_encoding
        self.itn = self.loop.itn is not None
        self.stream.cutter.keyterms = self.limits.keyterms
        engine = self.loop.engine
        self.turns = TurnTracker(self.limits.turns, engine.frame_ms, engine.eou_id,
                                 engine.vad is not None)
        self.channel.send(messages.hello(self.stream.id, self.stream.input_rate,
                                         self.registry.model))
        if self.limits.idle_timeout:
            self._idle = self.registry.clock.callLater(self.limits.idle_timeout,
                                                       self._idle_timeout)

    def message_received(self, raw):
        if self.stream is None:
            return
        self._touch()
        try:
            message = messages.parse(raw, self.encoding)
        except messages.ProtocolError as e:
            self.send_error(str(e), e.kind)
            return
        if isinstance(message, messages.Ping):
            self.channel.send(messages.pong())
        elif isinstance(message, messages.Close):
            self._finish("close")
        elif isinstance(message, messages.Audio):
            self._audio(message)
        elif isinstance(message, messages.Flush):
            self._flush()
        elif isinstance(message, messages.Config):
            self._config(message)

    def audio_received(self, payload, encoding=None):
        """Raw audio bytes outside JSON (a binary WebSocket message), in
        encoding or the connection's binary encoding."""
        if self.stream is None:
            return
        self._touch()
        try:
            samples = decode_samples(payload, encoding or self.binary_encoding)
        except AudioError as e:
            self.send_error(str(e), e.kind)
            return
        self._audio(messages.Audio(samples))

    def audio(self, samples, final=False):
        """Decoded audio samples at the stream's input rate, from a client
        that speaks another API."""
        if self.stream is None:
            return
        self._touch()
        self._audio(messages.Audio(samples, final))

    def configure(self, sample_rate=None, encoding=None):
        """As a ``config`` message would."""
        if self.stream is None:
            return
        self._touch()
        self._config(messages.Config(sample_rate, encoding))

    def flush(self):
        """As a ``flush`` message would."""
        if self.stream is None:
            return
        self._touch()
        self._flush()

    def close_stream(self):
        """As a ``close`` message would."""
        if self.stream is None:
            return
        self._touch()
        self._finish("close")

    def keep_alive(self):
        """A message that says only that the client is still there."""
        if self.stream is not None:
            self._touch()

    def message_too_large(self, size=None):
        self.send_error(
            "message too large: the limit is %d bytes%s"
            % (self.limits.max_message_bytes,
               "" if size is None else " (got %d)" % (size,)), "too_large")

    def connection_lost(self):
        self.connected = False
        self._cancel_timers()
        if self.stream is not None and self.stream in self.registry:
            self._finish("disconnected")

    def write_blocked(self):
        """The client stopped reading: what the server sends piles up."""
        if self.limits.write_timeout and self._unread is None:
            self._unread = self.registry.clock.callLater(self.limits.write_timeout,
                                                         self._write_timeout)

    def write_unblocked(self):
        if self._unread is not None:
            self._unread.cancel()
            self._unread = None

    # timers

    def _touch(self):
        if self._idle is not None:
            self._idle.reset(self.limits.idle_timeout)

    def _cancel_timers(self):
        for call in (self._idle, self._unread):
            if call is not None and call.active():
                call.cancel()
        self._idle = self._unread = None

    def _idle_timeout(self):
        self._idle = None
        self.end_stream("idle-timeout",
                        "no message for %g s (--idle-timeout): the stream was finalized"
                        % (self.limits.idle_timeout,))

    def _write_timeout(self):
        self._unread = None
        self.log.warn("stream {stream_id}: {peer} has not read what the server sent for "
                      "{seconds} s (--write-timeout); dropping the connection",
                      stream_id=self.stream.id, peer=self.channel.peer,
                      seconds=self.limits.write_timeout)
        self.channel.abort()

    def end_stream(self, reason, why):
        """Finalize the stream on the server's initiative, telling the client why."""
        if self.stream is None or self.stream.finishing:
            return
        if self.connected:
            self.send_error(why, reason.replace("-", "_"))
        self._finish(reason)

    def send_error(self, text, kind):
        """Send the client an error message; kind: what it is about, a fixed
        word the metrics count it under."""
        self.registry.metrics.error_sent(kind)
        self.channel.error(text, kind)

    # audio

    def _ended(self, what):
        """Whether the stream is finishing; if so, the client is told that
        what it sent was ignored."""
        if self.stream.finishing:
            self.send_error("%s after the end of the stream (%s) was ignored"
                            % (what, self.stream.end_reason), "after_end")
            return True
        return False

    def _config(self, message):
        stream = self.stream
        if self._ended("config"):
            return
        if message.itn and self.loop.itn is None:
            self.send_error("config: this server was started without --itn: it has no "
                            "written forms; the config was ignored", "bad_message")
            return
        language = None
        if message.language is not None:
            try:
                language = self.registry.model.check_language(message.language)
            except ValueError as e:
                self.send_error("config: %s; the config was ignored" % (e,), "bad_message")
                return
        if stream.received and message.sample_rate not in (None, stream.input_rate):
            self.send_error(
                "config: sample_rate can only change before the first audio message "
                "(the stream is at %d Hz); the config was ignored" % (stream.input_rate,),
                "bad_sample_rate")
            return
        if message.sample_rate is not None:
            stream.set_input_rate(message.sample_rate)
        if message.encoding is not None:
            self.encoding = self.binary_encoding = message.encoding
        if message.results is not None:
            self.every_chunk = message.results == "every_chunk"
        if message.itn is not None:
            self.itn = message.itn
        if message.keyterms is not None:
            self.set_keyterms(message.keyterms)
        if language is not None:
            self.stream.cutter.language = language

    def set_language(self, code):
        """The stream's language, for a multilingual model, from the audio
        not yet decoded on; ValueError, changing nothing, if the model
        takes no such language."""
        self.stream.cutter.language = self.registry.model.check_language(code)

    def set_keyterms(self, keyterms):
        """Phrases the stream's decoding favours (with the server's own, if
        any), in place of those it had: from the audio not yet decoded on."""
        self.stream.cutter.keyterms = tuple(dict.fromkeys(self.limits.keyterms + keyterms))

    def _flush(self):
        if self._ended("flush"):
            return
        self.stream.flush()
        if not self._flushed():
            self.loop.wake()

    def _flushed(self):
        """Answer the flushes whose audio is all decoded; whether any was."""
        stream = self.stream
        answered = False
        while stream.flushes and stream.flushes[0] <= stream.decoded_samples:
            stream.flushes.pop(0)
            self._send_result([], [], False, self.turns.flush())
            answered = True
        return answered

    def _audio(self, message):
        stream = self.stream
        if self._ended("audio"):
            return
        if message.sample_rate is not None and message.sample_rate != stream.input_rate:
            if stream.received:
                self.send_error(
                    "sample_rate %d differs from the stream's %d Hz: it can only change "
                    "before the first audio message; the audio was ignored"
                    % (message.sample_rate, stream.input_rate), "bad_sample_rate")
                return
            stream.set_input_rate(message.sample_rate)
        samples = message.samples
        room = int(self.limits.max_stream_seconds * stream.input_rate) - stream.received
        if len(samples) > room:
            stream.push(samples[:max(room, 0)])
            self.send_error(
                "stream exceeded --max-stream-seconds=%g: audio after %.2f s was not "
                "decoded; the stream is being finalized"
                % (self.limits.max_stream_seconds, stream.audio_seconds),
                "max_stream_seconds")
            self._finish("max-stream-seconds")
            return
        stream.push(samples)
        if message.final:
            self._finish("final")
            return
        if stream.cutter.ready:
            # Step on the reactor's next turn, with every chunk its reads
            # complete, rather than at the loop's next tick.
            self.loop.wake()
        if not self._backlogged and stream.cutter.buffered_samples > self._max_backlog:
            # Sent faster than it is decoded: read no more until it catches up.
            self._backlogged = True
            self.channel.pause_reading(BACKLOG)

    def _finish(self, reason):
        if not self.stream.finishing:
            if self._idle is not None:
                self._idle.cancel()
                self._idle = None
            self.stream.finish(reason)
            self.loop.wake()

    # decode loop events

    def stream_result(self, stream, result):
        if not self.connected:
            return
        if self._backlogged and stream.cutter.buffered_samples <= self._max_backlog / 2:
            self._backlogged = False
            self.channel.resume_reading(BACKLOG)
        parts = self.turns.step(result, result.pieces, stream.audio_ms, result.is_last,
                                always=self.every_chunk)
        for i, part in enumerate(parts):
            self.text += part.text
            self._send_result(part.token_ids, part.confidences,
                              result.is_last and i == len(parts) - 1, part.turn)
        if result.is_last:
            self._close_when_sent = True
            self._deliver()
            return
        self._flushed()
        if self.turns.finalize_due and not stream.finishing:
            self.log.info("stream {stream_id}: {ms} ms of silence: finalized "
                          "(--finalize-silence-ms)", stream_id=stream.id,
                          ms=self.limits.turns.finalize_silence_ms)
            self._finish("silence")

    def _send_result(self, token_ids, confidences, is_final, turn):
        self._outbox.append((self.text, list(token_ids), list(confidences), is_final,
                             self.stream.audio_ms, turn, self.itn))
        self._deliver()

    def _deliver(self):
        """Send what waits in the outbox, in order, until an ended
        utterance's written form must be found first (off the reactor
        thread); close the connection after the last result if it is due."""
        while self._outbox and not self._writing:
            spoken, token_ids, confidences, is_final, audio_ms, turn, itn = self._outbox[0]
            utterance = (turn or {}).get("utterance")
            if (itn and utterance is not None and utterance["words"]
                    and "spoken_text" not in utterance):
                self._writing = True
                d = self.loop.itn.utterance(utterance["words"])
                d.addErrback(self._unwritten, utterance)
                d.addCallback(self._written_utterance, utterance)
                return
            self._outbox.pop(0)
            if utterance is not None:
                # The utterance's text as sent replaces what was said since
                # the last one ended.
                self._written += (" " + utterance["text"] if "spoken_text" in utterance
                                  else spoken[self._spoken_done:])
                self._spoken_done = len(spoken)
            if self.connected:
                self.channel.send(messages.result(
                    self.stream.id, (self._written + spoken[self._spoken_done:]).strip(),
                    token_ids, confidences, is_final, audio_ms, turn,
                    spoken.strip() if itn else None))
        if not self._outbox and self._close_when_sent:
            self._close_when_sent = False
            if self.connected:
                self.channel.close()

    def _written_utterance(self, words, utterance):
        """words: the utterance's written words, or None if they could not
        be found (it is sent as spoken)."""
        utterance["spoken_text"] = utterance["text"]
        if words is not None:
            utterance["text"] = " ".join(w["word"] for w in words)
            utterance["words"] = words
        self._writing = False
        self._deliver()

    def _unwritten(self, failure, utterance):
        self.log.failure("stream {stream_id}: no written form for {text!r}", failure,
                         stream_id=self.stream.id, text=utterance["text"])
        return None

    def stream_failed(self, stream, reason):
        if self.connected:
            self.send_error(reason, "shutdown" if stream.end_reason == "drain-timeout"
                            else "internal")
            self.channel.close()
