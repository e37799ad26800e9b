"""
``parakeet-server transcribe``: stream audio files to a running server and
print their transcripts, one line per utterance with its times.

Each file is its own stream, sent at its own sample rate (the server
resamples it) in 100 ms messages, paced in real time or as fast as the
server reads.  On a terminal the utterance being spoken is shown in place,
and long files get a progress bar on stderr.
"""

import os
import shutil
import sys

from twisted.internet import defer, task
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IPushProducer
from twisted.python import usage
from zope.interface import implementer

from ..audio import MAX_RATE, MIN_RATE
from ..server.messages import LOADING
from ..checkpoints import DEMO_SAMPLE
from ..options import CommandOptions, not_negative
from .audiofiles import read_audio_file

#: Audio per message, in seconds.
PIECE_SECONDS = 0.1
#: Files at least this long get a progress bar (on a terminal).
LONG_FILE_SECONDS = 10.0

#: Exit statuses: a file could not be read; the server or the connection
#: failed; interrupted.
EXIT_UNREADABLE, EXIT_FAILED, EXIT_INTERRUPTED = 2, 1, 130

NAME = "parakeet-server transcribe"

#: What is printed for a stream in which no words were recognised.
NOTHING_HEARD = "(no speech recognised)"


class TranscribeError(Exception):
    """One stream failed; str() says how, in one line."""


def _speed(value):
    speed = float(value)
    if not speed > 0:
        raise ValueError("--speed must be positive")
    return speed


class Options(CommandOptions):
    synopsis = "[options] [FILE...]"
    longdesc = ("Stream each FILE (WAV, FLAC, MP3, or anything else libsndfile reads; "
                "any sample rate, several channels mixed down; default: the demo "
                "model's bundled sample) to a running server, one stream per file, "
                "in 100 ms messages, and print each utterance as it ends, with its "
                "start and end in seconds: '[0.42-1.87] turn on the kitchen lights'. "
                "On a terminal the utterance being spoken is shown in place, and "
                "files longer than 10 s get a progress bar on stderr.  Exit status: "
                "0, 1 when the server or the connection failed, 2 when a file "
                "could not be read.")
    optParameters = [
        ("url", "u", "ws://127.0.0.1:8000", "Server address: ws://HOST:PORT[/PATH], "
         "wss://HOST:PORT[/PATH], tcp://HOST:PORT or tls://HOST:PORT."),
        ("token", "t", None, "Authentication token, for a server that requires one."),
        ("trust", None, None, "CA certificate file (PEM) to trust for the server's TLS "
         "certificate (wss:// and tls://), instead of the system's authorities."),
        ("speed", None, None, "Send audio this many times faster than real time.",
         _speed),
        ("wait", None, 60.0, "Seconds to keep trying while the server is starting "
         "(not listening yet, or still loading its model); 0: fail at once.",
         not_negative(float)),
    ]
    optFlags = [
        ("realtime", None, "Send audio paced at real time, as a live source would "
         "(the default)."),
        ("fast", None, "Send audio as fast as the server takes it (its flow control "
         "holds the client back while it decodes)."),
        ("partials", "p", "Also print each partial transcript of the utterance under "
         "way, as a line '... TEXT', when stdout is not a terminal (on a terminal it "
         "is always shown, in place)."),
    ]

    def parseArgs(self, *paths):
        self["files"] = list(paths) or [DEMO_SAMPLE]

    def postOptions(self):
        if self["realtime"] + self["fast"] + (self["speed"] is not None) > 1:
            raise usage.UsageError("choose one of --realtime, --fast and --speed")
        #: Times real time, or None: as fast as the server reads.
        self["pace"] = None if self["fast"] else (self["speed"] or 1.0)


# Streaming

@implementer(IPushProducer)
class _Writable:
    """Whether the connection takes more now: the transport pauses this
    producer when the server leaves our writes unread."""

    def __init__(self, transport):
        self.paused = False
        self._waiting = []
        transport.registerProducer(self, True)

    def wait(self):
        """A Deferred that fires once writing may go on."""
        if not self.paused:
            return defer.succeed(None)
        d = defer.Deferred()
        self._waiting.append(d)
        return d

    def pauseProducing(self):
        self.paused = True

    def resumeProducing(self):
        self.paused = False
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(None)

    stopProducing = resumeProducing


def _connect(reactor, url, token=None, trust=None):
    from .connection import connect

    try:
        return connect(reactor, url, token=token, trust=trust)
    except ValueError as e:
        return defer.fail(TranscribeError("%s: %s" % (url, e)))


def _starting(error):
    """Whether a failed attempt says the server is starting: not listening
    yet, or still loading its model."""
    from twisted.internet.error import ConnectionRefusedError

    return isinstance(error, ConnectionRefusedError) or str(error) == LOADING


@defer.inlineCallbacks
def _open(reactor, url, token, trust, wait, on_wait):
    """A connected client and the server's hello, trying again for up to
    wait seconds while the server is starting (on_wait is told once)."""
    deadline = reactor.seconds() + wait
    told = False
    while True:
        try:
            client = yield _connect(reactor, url, token, trust)
        except TranscribeError:
            raise
        except Exception as e:
            failure = e
        else:
            try:
                first = yield client.next(lambda m: m.get("type") in ("hello", "error"))
            except ConnectionDone:
                raise TranscribeError("the server closed the connection before saying hello")
            if first["type"] == "hello":
                return client, first
            if not client.closed.called:
                client.disconnect()
            yield client.closed
            failure = first["message"]
        if not _starting(failure) or reactor.seconds() + 0.5 > deadline:
            raise TranscribeError(
                "the server says: %s" % (failure,) if isinstance(failure, str)
                else "cannot connect to %s: %s" % (url, _one_line(failure)))
        if not told and on_wait is not None:
            on_wait("waiting up to %.0f s for the server at %s to start..." % (wait, url))
            told = True
        yield task.deferLater(reactor, 0.5, lambda: None)


@defer.inlineCallbacks
def stream(reactor, url, source, pace=1.0, token=None, trust=None, on_message=None,
           on_progress=None, wait=0.0, on_wait=None, on_hello=None):
    """Stream source (an :class:`~parakeet.clients.audiofiles.AudioSource`)
    to the server at url.

    pace: times real time, or None to send as fast as the server reads.
    on_message: called with each message from the server;
    on_progress: with the seconds of audio sent so far.
    wait: seconds to keep trying while the server is starting (refusing
    connections, or still loading its model); on_wait: told in one line
    when waiting starts; on_hello: called with the server's hello.
    Fires with the final result, or fails with TranscribeError.
    """
    client, hello = yield _open(reactor, url, token, trust, wait, on_wait)
    if on_hello is not None:
        on_hello(hello)
    if on_message is not None:
        client.on_message = on_message
    try:
        final = yield _send(reactor, client, hello, source, pace, on_progress)
    finally:
        if not client.closed.called:
            client.disconnect()
        yield client.closed
    return final


@defer.inlineCallbacks
def _send(reactor, client, hello, source, pace, on_progress):
    # The server resamples whatever rate it is told; rates it does not take
    # are converted here, to its own.
    rate = source.rate
    if MIN_RATE <= rate <= MAX_RATE:
        samples = source.samples
        if rate != int(hello["sample_rate"]):
            client.send({"type": "config", "sample_rate": rate})
    else:
        rate = int(hello["sample_rate"])
        samples = source.at_rate(rate)
    piece = max(1, int(round(rate * PIECE_SECONDS)))
    count = max(1, -(-len(samples) // piece))
    writable = _Writable(client.transport)
    started = reactor.seconds()
    for i in range(count):
        yield writable.wait()
        if client.closed.called:
            break
        if pace is not None:
            delay = started + i * piece / rate / pace - reactor.seconds()
            if delay > 0:
                yield task.deferLater(reactor, delay, lambda: None)
        chunk = samples[i * piece:(i + 1) * piece]
        try:
            client.send_audio(chunk, final=i == count - 1)
        except Exception:
            # The connection is closing (the server ended the stream).
            break
        if on_progress is not None:
            on_progress(min(len(samples), (i + 1) * piece) / rate)
    try:
        final = yield client.final()
    except ConnectionDone:
        errors = _errors(client)
        raise TranscribeError("the connection was lost before the final result%s"
                              % ("; the server said: " + errors if errors else ""))
    # The server closes the connection after the final result.
    yield client.closed
    errors = _errors(client)
    if errors:
        raise TranscribeError("the server says: %s" % (errors,))
    return final


def _errors(client):
    """The server's error messages, each once, in one line."""
    unique = []
    for message in client.errors():
        if message not in unique:
            unique.append(message)
    return "; ".join(unique)


def _one_line(error):
    text = " ".join(str(error).split()) or type(error).__name__
    return text


# Showing results

def _is_tty(stream):
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _width(stream):
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, ValueError, OSError):
        return shutil.get_terminal_size().columns


def format_utterance(utterance):
    """'[0.42-1.87] turn on the kitchen lights'"""
    return "[%.2f-%.2f] %s" % (utterance["start_ms"] / 1000.0, utterance["end_ms"] / 1000.0,
                               utterance["text"])


class Console:
    """What the command shows of one stream after another.

    Finished utterances go to out, one line each.  On a terminal one more
    line is redrawn in place: the utterance being spoken and, for long
    files, a progress bar; it is drawn on stderr when that is a terminal,
    else on stdout when that is.  With partial_lines and stdout not a
    terminal, each new partial transcript is also a line '... TEXT'.
    """

    BAR = 24

    def __init__(self, out, err, partial_lines=False):
        self.out = out
        self.err = err
        self.live = err if _is_tty(err) else out if _is_tty(out) else None
        self.partial_lines = partial_lines and not _is_tty(out)
        self._drawn = ""
        self._start(None)

    def _start(self, seconds):
        self.seconds = seconds
        self.sent = 0.0
        self.partial = ""
        self.done_text = ""     # the transcript up to the last finished utterance
        self.printed = 0        # utterances printed for this stream

    def begin(self, path, seconds, header=False):
        """A new stream of seconds of audio, from path."""
        self._start(seconds)
        if header:
            self.line("==> %s <==" % (path,))

    def progress(self, sent):
        self.sent = sent
        self._draw()

    def message(self, message):
        if message.get("type") != "result":
            return
        text = message.get("text", "")
        utterance = message.get("utterance")
        if utterance is not None:
            self.done_text = text
            self.partial = ""
            if utterance["text"]:
                self.printed += 1
                self.line(format_utterance(utterance))
            return
        if message.get("is_final"):
            return
        partial = text[len(self.done_text):].strip() if text.startswith(
            self.done_text) else text
        if partial != self.partial:
            self.partial = partial
            if self.partial_lines and partial:
                self.line("... " + partial)
            self._draw()

    def finished(self, final):
        """The stream's final result has come (its utterance, if any, is shown)."""
        if not self.printed:
            # A server without turn detection: the whole transcript, untimed.
            self.line(final["text"].strip() or NOTHING_HEARD)
        self.clear()

    def notice(self, text):
        """Tell the user something on err, in one line."""
        self._erase()
        self.err.write(text + "\n")
        self.err.flush()
        self._draw(force=True)

    def line(self, text):
        """Print a line on out, under the live line."""
        self._erase()
        self.out.write(text + "\n")
        self.out.flush()
        self._draw(force=True)

    def clear(self):
        self._erase()
        self._drawn = ""

    def _erase(self):
        if self.live is not None and self._drawn:
            self.live.write("\r\x1b[K")
            self.live.flush()

    def _draw(self, force=False):
        if self.live is None:
            return
        text = self._compose(_width(self.live) - 1)
        if text == self._drawn and not force:
            return
        self.live.write("\r" + text + "\x1b[K")
        self.live.flush()
        self._drawn = text

    def _compose(self, width):
        parts = []
        if self.live is self.err and self.seconds and self.seconds >= LONG_FILE_SECONDS:
            done = min(1.0, self.sent / self.seconds)
            filled = int(round(done * self.BAR))
            parts.append("%3d%% [%s%s] %.0f/%.0f s" % (
                done * 100, "#" * filled, "." * (self.BAR - filled), self.sent, self.seconds))
        if self.partial:
            parts.append(self.partial)
        text = "  ".join(parts)
        if len(text) > width > 1:
            # Keep the newest words in view.
            head = parts[0] + "  " if len(parts) == 2 else ""
            room = width - len(head) - 1
            text = head + ("\u2026" + text[len(text) - room:] if room > 0 else "")
            text = text[:width]
        return text


# The command

@defer.inlineCallbacks
def transcribe_files(reactor, options, out, err, read=None):
    """Stream each of options["files"]; fires with the exit status."""
    if read is None:
        read = read_audio_file
    console = Console(out, err, partial_lines=options["partials"])
    status = 0
    files = options["files"]
    for path in files:
        try:
            source = read(path)
        except (OSError, ValueError, RuntimeError) as e:
            console.clear()
            reason = e.strerror.lower() if isinstance(e, OSError) and e.strerror else _one_line(e)
            err.write("%s: cannot read %s: %s\n" % (NAME, path, reason))
            status = status or EXIT_UNREADABLE
            continue
        console.begin(path, source.seconds, header=len(files) > 1)
        try:
            final = yield stream(reactor, options["url"], source, options["pace"],
                                 options["token"], options["trust"],
                                 on_message=console.message, on_progress=console.progress,
                                 wait=options["wait"], on_wait=console.notice)
        except TranscribeError as e:
            console.clear()
            err.write("%s: %s: %s\n" % (NAME, path, e))
            return EXIT_FAILED
        except Exception as e:
            console.clear()
            err.write("%s: %s: %s: %s\n" % (NAME, path, type(e).__name__, _one_line(e)))
            return EXIT_FAILED
        console.finished(final)
    return status


def main(options):
    """Run the command; returns its exit status."""
    statuses = []

    def run(reactor):
        return transcribe_files(reactor, options, sys.stdout, sys.stderr).addCallback(
            statuses.append)

    try:
        task.react(run)
    except SystemExit:
        pass
    if statuses:
        return statuses[0]
    # Interrupted (Ctrl-C) before the end: leave the live line behind.
    if _is_tty(sys.stderr) or _is_tty(sys.stdout):
        (sys.stderr if _is_tty(sys.stderr) else sys.stdout).write("\n")
    return EXIT_INTERRUPTED


# For scripts and tests

@defer.inlineCallbacks
def transcribe(reactor, url, source, speed=1.0, out=None, partials=False, token=None,
               trust=None):
    """Stream source (an :class:`~parakeet.clients.audiofiles.AudioSource`)
    to the server at url, speed times real time (None: as fast as it
    reads), and print the whole final transcript; with partials, first each
    partial transcript as '... TEXT'.  Fires with the final transcript."""
    out = out or sys.stdout
    shown = [""]

    def show(message):
        if message.get("type") == "result" and not message["is_final"]:
            if message["text"] != shown[-1]:
                shown.append(message["text"])
                out.write("... %s\n" % (message["text"],))

    try:
        final = yield stream(reactor, url, source, speed, token, trust,
                             on_message=show if partials else None)
    except TranscribeError as e:
        raise RuntimeError(str(e))
    out.write((final["text"] or NOTHING_HEARD) + "\n")
    return final["text"]
