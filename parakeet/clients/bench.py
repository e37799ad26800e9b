"""
A load generator for a running server: ``parakeet-server bench``.

    parakeet-server bench --url ws://127.0.0.1:8000 --streams 8 --seconds 30

opens N concurrent streams, sends each of them real audio paced in real time
(``--chunk-ms`` of audio per message, on an absolute schedule), and reports
how late the server's results come back, how many streams kept up, and, with
``--server-pid``, the server's CPU and memory.  ``--find-max`` searches for
the most streams the server keeps up with; ``--ceiling-model`` runs the
same model in-process (:mod:`parakeet.measuring.ceiling`) for comparison: in lockstep,
and paced as the server decodes, with no sockets and no reactor.

Latency is measured with the ``audio_ms`` every result carries: the audio,
from the stream's first sample, that the server needed for the result.  A
result's latency is its arrival time minus the send time of the audio message
that first brought the stream to ``audio_ms``.
"""

import base64
import bisect
import datetime
import gc
import ipaddress
import json
import math
import os
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from urllib.parse import parse_qs, urlsplit

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import defer, endpoints, task
from twisted.protocols.basic import LineReceiver
from twisted.python import usage

from ..options import CommandOptions
from ..server.tap import not_negative, positive
from ..server.transports import send_at_once, skip_debug_formatting

#: What espeak-ng reads aloud when no --audio is given.
SPEECH_TEXT = (
    "Turn on the kitchen lights and set a timer for ten minutes. "
    "What is the weather going to be like tomorrow morning? "
    "Remind me to call the dentist on Thursday at half past three. "
    "Play some quiet music in the living room and close the blinds. "
    "How long does the train take from Paris to Berlin?")

#: How many error messages a report quotes.
QUOTED_ERRORS = 5

DEFINITIONS = {
    "latency": "arrival of a result minus the send time of the audio message "
               "whose cumulative audio first reached the result's audio_ms",
    "time_to_final": "arrival of the is_final result minus the send time of the "
                     "message with \"final\": true",
    "kept_up": "the stream opened, got no error, got its final result, and every "
               "result's latency and its time-to-final were <= --keep-up-ms",
    "bench_lateness": "how long after its scheduled time (stream start + k * chunk) "
                      "the bench sent each audio message",
}


# options

class Target:
    """The server to load: transport (``ws`` or ``tcp``), host, port and URL."""

    def __init__(self, url):
        parts = urlsplit(url)
        if parts.scheme not in ("ws", "tcp"):
            raise ValueError("the URL must start with ws:// or tcp://, got %r" % (url,))
        if not parts.hostname:
            raise ValueError("no host in %r" % (url,))
        try:
            port = parts.port
        except ValueError:
            raise ValueError("bad port in %r" % (url,))
        if port is None:
            if parts.scheme == "tcp":
                raise ValueError("a tcp:// URL needs a port: tcp://HOST:PORT")
            port = 80
        self.url = url
        self.transport = parts.scheme
        self.host = parts.hostname
        self.port = port
        self.query = parse_qs(parts.query)

    @property
    def loopback(self):
        """Whether the server is on this machine's loopback interface."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


class Options(CommandOptions):
    synopsis = "--url ws://HOST:PORT [options]"
    longdesc = ("Load a running server with N concurrent real-time streams and report "
                "result latency, how many streams kept up, and the server's CPU and "
                "memory (--server-pid).  --find-max searches for the most streams "
                "the server keeps up with.")

    optParameters = [
        ("url", None, "ws://127.0.0.1:8000",
         "Server to load: ws://HOST:PORT[/PATH] or tcp://HOST:PORT."),
        ("streams", "n", 1, "Concurrent streams (with --find-max: the first probe).",
         positive(int)),
        ("seconds", None, 30.0, "Audio each stream sends, in seconds; its audio is "
         "looped to fill them.", positive(float)),
        ("chunk-ms", None, 100, "Audio per message, in milliseconds.", positive(int)),
        ("stagger", None, None, "Stream starts are spread evenly over this many "
         "seconds [default: min(seconds / 4, 5)].", not_negative(float)),
        ("audio", None, None, "A mono WAV or FLAC file to send [default: speech "
         "synthesized by espeak-ng when it is installed, else synthetic tones]."),
        ("keep-up-ms", None, 1000.0, "A stream keeps up while every result's latency "
         "and its time-to-final stay within this many ms.", positive(float)),
        ("p95-ms", None, 320.0, "--find-max: most p95 latency, in ms, a passing "
         "probe may have.", positive(float)),
        ("max-streams", None, 1024, "--find-max: the most streams to try.",
         positive(int)),
        ("pause", None, 2.0, "--find-max: seconds to wait between probes (then, "
         "with --server-pid, until the server is idle).", not_negative(float)),
        ("final-timeout", None, 30.0, "Seconds a stream waits for its final result "
         "after its last audio.", positive(float)),
        ("server-pid", None, None, "PID of the server, when it runs on this machine: "
         "report its CPU and memory.", int),
        ("json", None, None, "Also write the full report to this file as JSON."),
        ("ceiling-model", None, None, "The served model's .nemo file: also time it "
         "in-process (parakeet.measuring.ceiling) at the same N before the load."),
        ("ceiling-device", None, "cpu", "PyTorch device for --ceiling-model."),
        ("ceiling-seconds", None, None, "Audio per stream for --ceiling-model, in "
         "seconds [default: --seconds]; its streams start as the load's do "
         "(--stagger).", positive(float)),
        ("ceiling-precision", None, None, "Model arithmetic for --ceiling-model, as "
         "the server's --precision [default: the server's default]."),
        ("ceiling-threads", None, None, "torch CPU threads for --ceiling-model "
         "[default: torch's own].", positive(int)),
    ]
    optFlags = [
        ("binary", None, "Send audio as binary WebSocket messages of raw pcm16 "
         "instead of base64 in JSON."),
        ("find-max", None, "Search for the most streams that all keep up with "
         "p95 latency <= --p95-ms: double N until a probe fails, then bisect."),
    ]

    def postOptions(self):
        try:
            self["target"] = Target(self["url"])
        except ValueError as e:
            raise usage.UsageError(str(e))
        if self["binary"]:
            if self["target"].transport != "ws":
                raise usage.UsageError("--binary needs a ws:// URL")
            if self["target"].query.get("encoding", ["pcm16"])[-1] != "pcm16":
                raise usage.UsageError("--binary sends pcm16: leave encoding= out of "
                                       "the URL")
        if self["stagger"] is None:
            self["stagger"] = min(self["seconds"] / 4, 5.0)
        if self["ceiling-seconds"] is None:
            self["ceiling-seconds"] = self["seconds"]
        if self["audio"] and not os.path.isfile(self["audio"]):
            raise usage.UsageError("no such audio file: %s" % (self["audio"],))
        if self["ceiling-model"] and not os.path.isfile(self["ceiling-model"]):
            raise usage.UsageError("no such model file: %s" % (self["ceiling-model"],))
        if self["server-pid"] is not None and not os.path.exists(
                "/proc/%d/stat" % (self["server-pid"],)):
            raise usage.UsageError("no process %d on this machine" % (self["server-pid"],))

    @property
    def framing(self):
        """How audio goes on the wire: ``tcp``, ``ws`` or ``ws-binary``."""
        if self["target"].transport == "tcp":
            return "tcp"
        return "ws-binary" if self["binary"] else "ws"


# statistics

def percentile(values, q):
    """The q-th percentile (0 to 100) of values, interpolated linearly between
    the nearest ranks (numpy's default method); None when there are none."""
    ordered = sorted(values)
    if not ordered:
        return None
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def result_latencies(results, cumulative_ms, sent_at, tolerance_ms=0.5):
    """The latency of each result, in the clock's units, or None where no
    message sent so far holds the audio it claims.

    results are ``(arrival, audio_ms)`` pairs; cumulative_ms[k] is the audio,
    in ms from the stream's first sample, that messages 0 to k hold together;
    sent_at[k] is when message k was sent.  A result's latency is its arrival
    minus the send time of the first message whose cumulative audio reaches
    its audio_ms (within tolerance_ms, for rounding).
    """
    latencies = []
    for arrival, audio_ms in results:
        if audio_ms is None or not math.isfinite(audio_ms):
            latencies.append(None)
            continue
        k = bisect.bisect_left(cumulative_ms, audio_ms - tolerance_ms)
        latencies.append(arrival - sent_at[k] if k < len(sent_at) else None)
    return latencies


@defer.inlineCallbacks
def find_max(probe, start, limit):
    """The largest N in [1, limit] for which probe(N) passes.

    probe returns a truth value or a Deferred of one; passing is taken to
    hold for every N below one that passes.  N doubles from start until a
    probe fails (or limit is reached), then the gap between the last pass and
    the first failure is bisected.  Fires with ``(best, tried)``: best is 0
    when no N passes; tried lists ``(N, passed)`` in the order probed.
    """
    tried = []
    good, bad = 0, None
    n = max(1, min(start, limit))
    while True:
        passed = bool((yield defer.maybeDeferred(probe, n)))
        tried.append((n, passed))
        if not passed:
            bad = n
            break
        good = n
        if n >= limit:
            break
        n = min(n * 2, limit)
    while bad is not None and bad - good > 1:
        middle = (good + bad) // 2
        passed = bool((yield defer.maybeDeferred(probe, middle)))
        tried.append((middle, passed))
        if passed:
            good = middle
        else:
            bad = middle
    return good, tried


def _ms(seconds):
    return None if seconds is None else round(seconds * 1000.0, 3)


def _spread(values_s, points=(50, 95, 99)):
    """Percentiles and max of durations in seconds, as a dict of ms."""
    summary = {"count": len(values_s)}
    for q in points:
        summary["p%d" % q] = _ms(percentile(values_s, q))
    summary["max"] = _ms(max(values_s)) if values_s else None
    return summary


# audio

class AudioSource:
    """Mono float32 samples at a known rate, and where they came from."""

    def __init__(self, samples, rate, description):
        self.samples = samples
        self.rate = rate
        self.description = description
        self._at = {rate: samples}

    @property
    def seconds(self):
        return len(self.samples) / self.rate

    def at_rate(self, rate):
        """The samples resampled to rate (soxr, high quality), computed once."""
        if rate not in self._at:
            import numpy as np
            import soxr

            self._at[rate] = np.asarray(
                soxr.resample(self.samples, self.rate, rate, quality="HQ"),
                dtype=np.float32)
        return self._at[rate]


def read_audio_file(path):
    """An audio file (WAV, FLAC, MP3, ...: what libsndfile reads) as an
    AudioSource; several channels are averaged."""
    import numpy as np

    # libsndfile says "System error." for a file that is missing, a folder
    # or unreadable; the OS says which, in words.
    with open(path, "rb"):
        pass
    try:
        import soundfile
    except ImportError:
        soundfile = None
    if soundfile is not None:
        data, rate = soundfile.read(path, dtype="float32", always_2d=True)
    else:
        import wave

        with wave.open(path) as wav:
            if wav.getsampwidth() != 2:
                raise ValueError("%s: only 16-bit WAV can be read without soundfile"
                                 % (path,))
            rate = wav.getframerate()
            frames = wav.readframes(wav.getnframes())
            data = (np.frombuffer(frames, "<i2").astype(np.float32) / 32768.0
                    ).reshape(-1, wav.getnchannels())
    if len(data) == 0:
        raise ValueError("%s holds no audio" % (path,))
    channels = data.shape[1]
    samples = np.ascontiguousarray(data.mean(axis=1) if channels > 1 else data[:, 0])
    description = "%s (%.1f s at %d Hz%s)" % (
        path, len(samples) / rate, rate,
        ", %d channels averaged to mono" % channels if channels > 1 else "")
    return AudioSource(samples.astype(np.float32), int(rate), description)


def synthesized_audio(text=SPEECH_TEXT):
    """Speech from espeak-ng when it is on PATH, else parakeet.measuring.replica's
    synthetic stand-in for speech (tones in noise)."""
    espeak = shutil.which("espeak-ng")
    if espeak:
        with tempfile.TemporaryDirectory() as scratch:
            path = os.path.join(scratch, "speech.wav")
            try:
                subprocess.run([espeak, "-w", path, text], check=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               timeout=60)
                source = read_audio_file(path)
            except (OSError, subprocess.SubprocessError, ValueError):
                source = None
        if source is not None:
            source.description = "speech synthesized by espeak-ng (%.1f s at %d Hz)" % (
                source.seconds, source.rate)
            return source
    from ..measuring.replica import SAMPLE_RATE, calibration_audio

    seconds = 10.0
    return AudioSource(calibration_audio(0, seconds), SAMPLE_RATE,
                       "synthetic tones in noise, parakeet.measuring.replica.calibration_audio "
                       "(%.1f s at %d Hz; espeak-ng is not installed)"
                       % (seconds, SAMPLE_RATE))


class Payloads:
    """The messages of one stream, encoded once and shared by every stream.

    steps[k] is what goes on the wire at the k-th tick of the schedule, a
    tuple of ``(bytes, is_binary)`` frames; cumulative_ms[k] is the audio the
    first k + 1 ticks hold, in ms; a tick comes every ``interval`` seconds.
    The last tick carries ``"final": true``.  ``config`` is the frame sent
    before the first tick: it asks for a result after every decoded chunk,
    so that every chunk's latency is measured, not only those that brought
    new words.
    """

    def __init__(self, samples, rate, seconds, chunk_ms, framing):
        import numpy as np

        from ..audio import encode_samples

        chunk = max(1, round(rate * chunk_ms / 1000.0))
        total = max(1, round(seconds * rate))
        pcm = encode_samples(np.resize(samples, total), "pcm16")
        self.rate = rate
        self.interval = chunk / rate
        self.steps = []
        self.cumulative_ms = []
        config = json.dumps({"type": "config", "results": "every_chunk"}).encode("ascii")
        self.config = (config + b"\n" if framing == "tcp" else config, False)
        for start in range(0, total, chunk):
            end = min(start + chunk, total)
            piece = pcm[2 * start:2 * end]
            final = end == total
            if framing == "ws-binary":
                frames = [(piece, True)]
                if final:
                    frames.append((_audio_json(b"", True), False))
            else:
                line = _audio_json(piece, final)
                frames = [(line + b"\n" if framing == "tcp" else line, False)]
            self.steps.append(tuple(frames))
            self.cumulative_ms.append(end * 1000.0 / rate)
        self.audio_seconds = total / rate


def _audio_json(pcm, final):
    return json.dumps({"type": "audio", "data": base64.b64encode(pcm).decode("ascii"),
                       "encoding": "pcm16", "final": final}).encode("ascii")


class Workload:
    """The audio every stream sends, with its encoded messages cached by rate."""

    def __init__(self, source, seconds, chunk_ms, framing):
        self.source = source
        self.seconds = seconds
        self.chunk_ms = chunk_ms
        self.framing = framing
        self._plans = {}

    def plan_for(self, rate):
        if rate not in self._plans:
            self._plans[rate] = Payloads(self.source.at_rate(rate), rate, self.seconds,
                                         self.chunk_ms, self.framing)
        return self._plans[rate]


# one stream

class _TCPStream(LineReceiver):
    """A stream's TCP connection: newline-delimited JSON."""

    delimiter = b"\n"
    MAX_LENGTH = 1 << 26

    def __init__(self, stream):
        self.stream = stream

    def connectionMade(self):
        send_at_once(self.transport)
        self.stream.attached(self)

    def lineReceived(self, line):
        if line.strip():
            self.stream.received(line)

    def send(self, data, binary):
        self.transport.write(data)  # the payloads end with their newline

    def drop(self):
        self.transport.abortConnection()

    def connectionLost(self, reason):
        self.stream.lost()


class _WebSocketStream(WebSocketClientProtocol):
    """A stream's WebSocket connection: one message per JSON object, or
    binary messages of raw audio."""

    opened = False

    def onOpen(self):
        self.opened = True
        self.factory.stream.attached(self)

    def dataReceived(self, data):
        skip_debug_formatting(self, data)

    def onMessage(self, payload, isBinary):
        self.factory.stream.received(payload)

    def send(self, data, binary):
        self.sendMessage(data, isBinary=binary)

    def drop(self):
        self.transport.abortConnection()

    def onClose(self, wasClean, code, reason):
        if self.opened:
            self.factory.stream.lost()
        else:
            self.factory.stream.lost("WebSocket handshake failed: %s %s"
                                     % (code, reason or ""))


def connect_stream(reactor, target, stream):
    """Open stream's connection; a Deferred that fails if it cannot be made."""
    endpoint = endpoints.HostnameEndpoint(reactor, target.host, target.port, timeout=30)
    if target.transport == "tcp":
        return endpoints.connectProtocol(endpoint, _TCPStream(stream))
    factory = WebSocketClientFactory(target.url)
    factory.protocol = _WebSocketStream
    factory.stream = stream
    factory.setProtocolOptions(maxMessagePayloadSize=0, maxFramePayloadSize=0,
                               openHandshakeTimeout=30, tcpNoDelay=True)
    return endpoint.connect(factory)


class BenchStream:
    """One stream of a run: its schedule, when it sent each message, and what
    came back when.  Times are the run's clock (seconds, monotonic)."""

    def __init__(self, run, index, offset):
        self.run = run
        self.index = index
        self.offset = offset  #: seconds after the run's start that it connects
        self.stream_id = None
        self.connecting_at = None  #: when it began to connect
        self.hello_at = None
        self.opened = False
        self.plan = None      #: the Payloads it sends, once hello said the rate
        self.start = None     #: when tick 0 was due; tick k is due at start + k * interval
        self.sent_at = []     #: when each tick was sent
        self.results = []     #: (arrival, audio_ms, is_final) of each result
        self.errors = []
        self.final_sent_at = None
        self.final_at = None
        self.done = defer.Deferred()  #: fires with self once the connection is over
        self._proto = None
        self._pending = None  #: the next tick, or the wait for the final result
        self._timed_out = False

    def connect(self):
        self.connecting_at = self.run.clock()
        d = defer.maybeDeferred(self.run.connector, self)
        d.addErrback(self._cannot_connect)

    def _cannot_connect(self, failure):
        self.errors.append("cannot connect: %s" % (failure.getErrorMessage(),))
        self._end()

    def attached(self, proto):
        self._proto = proto

    def received(self, data):
        at = self.run.clock()
        try:
            message = json.loads(data)
            kind = message.get("type")
        except (ValueError, AttributeError):
            self.errors.append("unreadable message from the server: %r" % (data[:80],))
            return
        if kind == "result":
            audio_ms = message.get("audio_ms")
            final = bool(message.get("is_final"))
            self.results.append((at, float(audio_ms) if isinstance(audio_ms, (int, float))
                                 else None, final))
            if final and self.final_at is None:
                self.final_at = at
        elif kind == "hello":
            self._hello(message)
        elif kind == "error":
            self.errors.append(str(message.get("message")))

    def _hello(self, message):
        if self.opened:
            return
        self.opened = True
        self.hello_at = self.run.clock()
        self.stream_id = message.get("stream_id")
        try:
            self.plan = self.run.workload.plan_for(int(message["sample_rate"]))
        except (KeyError, TypeError, ValueError) as e:
            self.errors.append("cannot prepare audio for hello %r: %s" % (message, e))
            self._proto.drop()
            return
        self._proto.send(*self.plan.config)
        self.start = self.run.clock()
        self._tick()

    def _tick(self):
        self._pending = None
        k = len(self.sent_at)
        frames = self.plan.steps[k]
        self.sent_at.append(self.run.clock())
        for data, binary in frames:
            self._proto.send(data, binary)
        if k + 1 == len(self.plan.steps):
            self.final_sent_at = self.sent_at[-1]
            self._pending = self.run.reactor.callLater(self.run.final_timeout,
                                                       self._no_final)
        else:
            due = self.start + (k + 1) * self.plan.interval
            self._pending = self.run.reactor.callLater(
                max(0.0, due - self.run.clock()), self._tick)

    def _no_final(self):
        self._pending = None
        self._timed_out = True
        self.errors.append("no final result %g s after the last audio"
                           % (self.run.final_timeout,))
        self._proto.drop()

    def lost(self, reason=None):
        if self._pending is not None and self._pending.active():
            self._pending.cancel()
        self._pending = None
        if reason:
            self.errors.append(reason)
        elif self.opened and self.final_at is None and not self._timed_out:
            self.errors.append("the connection closed before the final result")
        elif not self.opened and not self.errors:
            self.errors.append("the connection closed before hello")
        self._end()

    def _end(self):
        if not self.done.called:
            self.done.callback(self)

    # what it measured

    def latencies(self):
        """(latency in s or None, is_final) of each result."""
        cumulative = self.plan.cumulative_ms if self.plan else []
        found = result_latencies([(at, ms) for at, ms, _ in self.results],
                                 cumulative, self.sent_at)
        return list(zip(found, [final for _, _, final in self.results]))

    def lateness(self):
        """How late each tick was sent, in seconds."""
        if self.start is None:
            return []
        return [at - (self.start + k * self.plan.interval)
                for k, at in enumerate(self.sent_at)]

    def hello_delay(self):
        """From beginning to connect to the server's hello, in seconds."""
        if self.hello_at is None or self.connecting_at is None:
            return None
        return self.hello_at - self.connecting_at

    def time_to_final(self):
        if self.final_at is None or self.final_sent_at is None:
            return None
        return self.final_at - self.final_sent_at

    def summary(self, keep_up_s):
        """This stream's part of the report."""
        latencies = [latency for latency, _ in self.latencies()]
        matched = [x for x in latencies if x is not None]
        ttf = self.time_to_final()
        kept_up = (self.opened and not self.errors and ttf is not None
                   and len(matched) == len(latencies)
                   and all(x <= keep_up_s for x in matched) and ttf <= keep_up_s)
        return {
            "index": self.index,
            "stream_id": self.stream_id,
            "opened": self.opened,
            "kept_up": kept_up,
            "hello_ms": _ms(self.hello_delay()),
            "ticks_sent": len(self.sent_at),
            "audio_seconds_sent": (round(self.plan.cumulative_ms[len(self.sent_at) - 1]
                                         / 1000.0, 3) if self.sent_at else 0.0),
            "results": len(self.results),
            "unmatched_results": len(latencies) - len(matched),
            "latency_ms": _spread(matched, (50, 95)),
            "time_to_final_ms": _ms(ttf),
            "errors": list(self.errors),
        }


# the server process

def process_cpu_seconds(pid):
    """User plus system CPU time of process pid, in seconds (/proc/PID/stat)."""
    with open("/proc/%d/stat" % (pid,)) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # After the command name: state is field 3, utime and stime fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_rss_bytes(pid):
    """Resident memory of process pid, in bytes (VmRSS of /proc/PID/status)."""
    with open("/proc/%d/status" % (pid,)) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return None


#: Seconds over which --find-max finds the server idle (or not).
IDLE_WINDOW = 0.5


@defer.inlineCallbacks
def wait_until_idle(reactor, cpu_seconds, busy=0.2, window=IDLE_WINDOW, limit=60.0):
    """Wait until a process uses less than busy of a core over window
    seconds, or for limit seconds at most; cpu_seconds() reads its CPU time.
    The Deferred fires with the seconds waited."""
    started = reactor.seconds()
    before = cpu_seconds()
    while True:
        yield task.deferLater(reactor, window, lambda: None)
        now = cpu_seconds()
        if now - before < busy * window or reactor.seconds() - started >= limit:
            return reactor.seconds() - started
        before = now


class ServerSampler:
    """The server process's CPU time over a run, and its resident memory
    before, at the peak (sampled every interval seconds) and at the end."""

    def __init__(self, reactor, pid, interval=0.5):
        self.reactor = reactor
        self.pid = pid
        self.interval = interval
        self.gone = False

    def start(self):
        self.cpu_before = process_cpu_seconds(self.pid)
        self.rss_before = self.rss_peak = process_rss_bytes(self.pid)
        self._loop = task.LoopingCall(self._sample)
        self._loop.clock = self.reactor
        self._loop.start(self.interval, now=False)

    def _sample(self):
        try:
            rss = process_rss_bytes(self.pid)
        except OSError:
            self.gone = True
            self._loop.stop()
            return
        self.rss_peak = max(self.rss_peak or 0, rss or 0)

    def stop(self, wall_s, n_streams):
        if self._loop.running:
            self._loop.stop()
        report = {"pid": self.pid, "cpu_percent": None, "rss_before_bytes": self.rss_before,
                  "rss_peak_bytes": self.rss_peak, "rss_end_bytes": None,
                  "rss_per_stream_bytes": None}
        try:
            cpu = process_cpu_seconds(self.pid)
            report["rss_end_bytes"] = process_rss_bytes(self.pid)
        except OSError:
            report["note"] = "the server process ended during the run"
            return report
        report["rss_peak_bytes"] = max(self.rss_peak or 0, report["rss_end_bytes"] or 0)
        report["cpu_percent"] = round(100.0 * (cpu - self.cpu_before) / wall_s, 1)
        report["rss_per_stream_bytes"] = round(
            (report["rss_peak_bytes"] - self.rss_before) / n_streams)
        return report


# one run

class Run:
    """N streams against the server at once; ``go()`` fires with its report."""

    def __init__(self, reactor, options, workload, n_streams, clock=time.monotonic):
        self.reactor = reactor
        self.options = options
        self.workload = workload
        self.n = n_streams
        self.clock = clock
        self.final_timeout = options["final-timeout"]
        self.connector = lambda stream: connect_stream(reactor, options["target"], stream)
        stagger = options["stagger"]
        self.streams = [BenchStream(self, i, stagger * i / n_streams)
                        for i in range(n_streams)]

    @defer.inlineCallbacks
    def go(self):
        server = None
        if self.options["server-pid"] is not None:
            server = ServerSampler(self.reactor, self.options["server-pid"])
            server.start()
        usage_before = resource.getrusage(resource.RUSAGE_SELF)
        started = self.clock()
        for stream in self.streams:
            self.reactor.callLater(stream.offset, stream.connect)
        yield defer.DeferredList([s.done for s in self.streams])
        wall = self.clock() - started
        usage_after = resource.getrusage(resource.RUSAGE_SELF)
        bench_cpu = (usage_after.ru_utime + usage_after.ru_stime
                     - usage_before.ru_utime - usage_before.ru_stime)
        return self.report(wall, bench_cpu, server.stop(wall, self.n) if server else None)

    def report(self, wall, bench_cpu, server):
        options = self.options
        keep_up_s = options["keep-up-ms"] / 1000.0
        per_stream = [s.summary(keep_up_s) for s in self.streams]
        latencies, finals = [], []
        for stream in self.streams:
            latencies.extend(x for x, _ in stream.latencies() if x is not None)
            if stream.time_to_final() is not None:
                finals.append(stream.time_to_final())
        lateness = [x for s in self.streams for x in s.lateness()]
        hellos = [s.hello_delay() for s in self.streams if s.hello_delay() is not None]
        errors = ["stream %d: %s" % (s.index, e) for s in self.streams for e in s.errors]
        interval = self.workload.chunk_ms / 1000.0
        behind = bool(lateness) and max(lateness) > interval
        run = {
            "streams": self.n,
            "framing": options.framing,
            "url": options["target"].url,
            "seconds": options["seconds"],
            "chunk_ms": options["chunk-ms"],
            "stagger_s": options["stagger"],
            "wall_s": round(wall, 3),
            "opened": sum(1 for s in per_stream if s["opened"]),
            "kept_up": sum(1 for s in per_stream if s["kept_up"]),
            "finished": len(finals),
            "results": sum(s["results"] for s in per_stream),
            "unmatched_results": sum(s["unmatched_results"] for s in per_stream),
            "latency_ms": _spread(latencies),
            "time_to_final_ms": _spread(finals, (50, 95)),
            "hello_ms": _spread(hellos, (50, 95)),
            "errors": {"count": len(errors), "first": errors[:QUOTED_ERRORS]},
            "bench": {
                "lateness_ms": _spread(lateness, (50, 99)),
                "behind": behind,
                "cpu_percent": round(100.0 * bench_cpu / wall, 1) if wall > 0 else None,
            },
            "server": server,
            "per_stream": per_stream,
        }
        run["passed"], run["verdict"] = verdict(run, options["p95-ms"])
        return run


def verdict(run, p95_ms):
    """(passed, why): whether every stream kept up with p95 latency <= p95_ms,
    in a measurement the bench kept to its schedule."""
    if run["bench"]["behind"]:
        return False, "invalid: the bench fell behind"
    if run["errors"]["count"]:
        return False, "errors"
    if run["kept_up"] < run["streams"]:
        return False, "%d did not keep up" % (run["streams"] - run["kept_up"],)
    p95 = run["latency_ms"]["p95"]
    if p95 is None:
        return False, "no results"
    if p95 > p95_ms:
        return False, "p95 > %g ms" % (p95_ms,)
    return True, "pass"


# the in-process ceiling

def load_engine(path, device, capacity, precision=None):
    """The model at path, ready to decode capacity streams in one step."""
    from ..engine.engine import Engine

    return Engine.load(path, device=device, num_slots=capacity, batch_size=capacity,
                       precision=precision)


class Ceiling:
    """The served model driven in-process by :mod:`parakeet.measuring.ceiling`: what
    the engine can do with no sockets and no reactor."""

    def __init__(self, path, device, seconds, threads=None, precision=None,
                 p95_ms=320.0, keep_up_ms=1000.0, message_ms=100, stagger=None,
                 source=None):
        """stagger: seconds over which the paced streams' starts spread
        [default: as :func:`parakeet.measuring.ceiling.measure_paced` spreads them];
        source: the :class:`AudioSource` every stream decodes [default:
        the replica's calibration audio]."""
        self.p95_ms = p95_ms
        self.source = source
        self.stagger = stagger
        self.keep_up_ms = keep_up_ms
        self.message_ms = message_ms
        self.path = path
        self.device = device
        self.precision = precision
        self.seconds = seconds
        self.threads = threads
        self.engine = None
        self.capacity = 0
        self._next_id = 1

    def measure(self, n):
        """n streams decoded in lockstep (step times, and whether a step fits
        in a chunk), then paced as the server decodes them (latencies, and
        whether they pass as the bench's probes do)."""
        from ..measuring import ceiling

        if self.threads:
            import torch

            torch.set_num_threads(self.threads)
        if n > self.capacity:
            self.engine = None
            gc.collect()
            self.capacity = max(n, 16, 2 * self.capacity)
            self.engine = load_engine(self.path, self.device, self.capacity, self.precision)
        audio = None
        if self.source is not None:
            audio = self.source.at_rate(self.engine.sample_rate).astype("float32")
        times = ceiling.measure(self.engine, n, self.seconds, self._next_id, audio)
        self._next_id += n
        chunk = self.engine.geometry.chunk_seconds
        result = {"streams": n, "steps": 0, "step_p50_ms": None, "step_p95_ms": None,
                  "chunk_ms": _ms(chunk), "fits": False}
        if times:
            p50, p95 = ceiling.step_percentiles(times)
            result.update(steps=len(times), step_p50_ms=_ms(p50), step_p95_ms=_ms(p95),
                          fits=p95 < chunk)
        paced = ceiling.measure_paced(self.engine, n, self.seconds, self._next_id,
                                      stagger=self.stagger, message_ms=self.message_ms,
                                      audio=audio)
        self._next_id += n
        result["paced"] = ceiling.paced_summary(*paced, bound=self.p95_ms / 1000.0,
                                                keep_up=self.keep_up_ms / 1000.0)
        result["passed"] = result["paced"]["passes"]
        return result

    def close(self):
        self.engine = None
        gc.collect()


# the report as text

def _fmt_ms(value):
    return "-" if value is None else "%.0f" % (value,)


def human_bytes(n):
    if n is None:
        return "-"
    if abs(n) >= 1 << 30:
        return "%.2f GiB" % (n / float(1 << 30),)
    return "%.1f MiB" % (n / float(1 << 20),)


def _framing_words(framing):
    return {"tcp": "TCP, newline-delimited JSON", "ws": "WebSocket, base64 in JSON",
            "ws-binary": "WebSocket, binary pcm16"}[framing]


TABLE_HEADER = ("%6s %6s %7s %7s %7s %7s %7s %7s %7s %7s %6s %8s %7s %10s  %s" % (
    "N", "opened", "kept-up", "results", "p50 ms", "p95 ms", "p99 ms", "max ms",
    "ttf p50", "ttf p95", "errors", "late max", "srv cpu", "srv rss", "verdict"))


def table_row(run):
    server = run["server"] or {}
    cpu = server.get("cpu_percent")
    return "%6d %6d %7s %7d %7s %7s %7s %7s %7s %7s %6d %8s %7s %10s  %s" % (
        run["streams"], run["opened"], "%d/%d" % (run["kept_up"], run["streams"]),
        run["results"], _fmt_ms(run["latency_ms"]["p50"]), _fmt_ms(run["latency_ms"]["p95"]),
        _fmt_ms(run["latency_ms"]["p99"]), _fmt_ms(run["latency_ms"]["max"]),
        _fmt_ms(run["time_to_final_ms"]["p50"]), _fmt_ms(run["time_to_final_ms"]["p95"]),
        run["errors"]["count"], _fmt_ms(run["bench"]["lateness_ms"]["max"]),
        "-" if cpu is None else "%.0f%%" % cpu,
        human_bytes(server.get("rss_peak_bytes")), run["verdict"])


def run_details(run):
    """Lines on one run beyond its table row."""
    lines = ["N=%d: %.1f s; %d of %d streams finished; connect to hello p50 %s ms, max %s ms; "
             "bench lateness p50 %s ms, p99 %s ms, max %s ms; bench cpu %s%%" % (
                 run["streams"], run["wall_s"], run["finished"], run["streams"],
                 _fmt_ms(run["hello_ms"]["p50"]), _fmt_ms(run["hello_ms"]["max"]),
                 _fmt_ms(run["bench"]["lateness_ms"]["p50"]),
                 _fmt_ms(run["bench"]["lateness_ms"]["p99"]),
                 _fmt_ms(run["bench"]["lateness_ms"]["max"]),
                 _fmt_ms(run["bench"]["cpu_percent"]))]
    if run["bench"]["behind"]:
        lines.append("  !!! INVALID MEASUREMENT: the bench itself fell behind its schedule "
                     "by %s ms, more than one %d ms chunk: it could not offer the load. "
                     "Run fewer streams per bench process, or the bench on another machine."
                     % (_fmt_ms(run["bench"]["lateness_ms"]["max"]), run["chunk_ms"]))
    server = run["server"]
    if server:
        lines.append("  server pid %d: cpu %s%% (100%% = one core); rss %s before, %s peak, "
                     "%s at the end; %s per stream (peak - before) / N%s" % (
                         server["pid"], _fmt_ms(server["cpu_percent"]),
                         human_bytes(server["rss_before_bytes"]),
                         human_bytes(server["rss_peak_bytes"]),
                         human_bytes(server["rss_end_bytes"]),
                         human_bytes(server["rss_per_stream_bytes"]),
                         "; " + server["note"] if server.get("note") else ""))
    if run["unmatched_results"]:
        lines.append("  %d results had no audio_ms that matches the audio sent: no latency "
                     "for them" % (run["unmatched_results"],))
    if run["errors"]["count"]:
        lines.append("  errors: %d, first: %s" % (
            run["errors"]["count"], "; ".join(run["errors"]["first"])))
    return lines


def summary_line(run, transport):
    """The one-line summary of a run."""
    server = run["server"] or {}
    line = ("bench: N=%d %s kept-up %d/%d p50 %s ms p95 %s ms p99 %s ms ttf p50 %s ms "
            "errors %d") % (
        run["streams"], transport, run["kept_up"], run["streams"],
        _fmt_ms(run["latency_ms"]["p50"]), _fmt_ms(run["latency_ms"]["p95"]),
        _fmt_ms(run["latency_ms"]["p99"]), _fmt_ms(run["time_to_final_ms"]["p50"]),
        run["errors"]["count"])
    if server.get("cpu_percent") is not None:
        line += " server-cpu %.0f%% rss %s" % (server["cpu_percent"],
                                              human_bytes(server["rss_peak_bytes"]))
    if run["bench"]["behind"]:
        line += " INVALID (bench behind by %s ms)" % (
            _fmt_ms(run["bench"]["lateness_ms"]["max"]),)
    return line


def ceiling_lines(result):
    paced = result["paced"]
    return [
        "ceiling N=%d lockstep: step p50 %s ms, p95 %s ms over %d steps; chunk %s ms: %s" % (
            result["streams"], _fmt_ms(result["step_p50_ms"]), _fmt_ms(result["step_p95_ms"]),
            result["steps"], _fmt_ms(result["chunk_ms"]),
            "a step of N streams fits in one chunk" if result["fits"]
            else "a step of N streams does NOT fit in one chunk"),
        "ceiling N=%d paced: latency p50 %s ms, p95 %s ms, max %s ms; ttf p50 %s ms: %s" % (
            result["streams"], _fmt_ms(paced["latency_p50_ms"]),
            _fmt_ms(paced["latency_p95_ms"]), _fmt_ms(paced["latency_max_ms"]),
            _fmt_ms(paced["ttf_p50_ms"]), "pass" if result["passed"] else "fail")]


# the whole bench

@defer.inlineCallbacks
def bench(reactor, options, out=None, command=None):
    """Run the bench options describe, printing to out as it goes; fires with
    the report, a dict (what --json writes)."""
    out = out or sys.stdout

    def say(line=""):
        out.write(line + "\n")
        out.flush()

    target = options["target"]
    framing = options.framing
    source = (read_audio_file(options["audio"]) if options["audio"]
              else synthesized_audio())
    workload = Workload(source, options["seconds"], options["chunk-ms"], framing)
    notes = []
    if target.loopback or options["server-pid"] is not None:
        notes.append("the server is on %s: the bench shares this machine's CPUs with it "
                     "and takes CPU from it, so the server's numbers are lower than it "
                     "would reach alone" % ("loopback" if target.loopback else "this machine"))
    command = list(command) if command else ["parakeet-server", "bench"]
    report = {
        "command": shlex.join(command),
        "argv": command,
        "started_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "target": {"url": target.url, "transport": target.transport, "host": target.host,
                   "port": target.port, "framing": framing, "loopback": target.loopback},
        "settings": {
            "streams": options["streams"], "seconds": options["seconds"],
            "chunk_ms": options["chunk-ms"], "stagger_s": options["stagger"],
            "keep_up_ms": options["keep-up-ms"], "p95_ms": options["p95-ms"],
            "find_max": bool(options["find-max"]), "max_streams": options["max-streams"],
            "final_timeout_s": options["final-timeout"],
            "server_pid": options["server-pid"],
        },
        "audio": {"description": source.description, "file": options["audio"],
                  "seconds": round(source.seconds, 3), "rate": source.rate},
        "definitions": dict(DEFINITIONS, kept_up=DEFINITIONS["kept_up"].replace(
            "--keep-up-ms", "%g ms" % options["keep-up-ms"])),
        "notes": notes,
        "ceiling": None,
        "runs": [],
        "find_max": None,
    }

    say("parakeet-server bench: %s (%s); %s; %g s of audio per stream in %d ms "
        "messages; starts spread over %g s"
        % (target.url, _framing_words(framing),
           "find-max from N=%d up to %d" % (options["streams"], options["max-streams"])
           if options["find-max"] else "N=%d" % options["streams"],
           options["seconds"], options["chunk-ms"], options["stagger"]))
    say("audio: %s%s" % (source.description,
                         ", looped" if source.seconds < options["seconds"] else ""))
    for note in notes:
        say("NOTE: " + note)
    say("latency:       " + report["definitions"]["latency"])
    say("time-to-final: " + report["definitions"]["time_to_final"])
    say("kept up:       " + report["definitions"]["kept_up"])

    if options["ceiling-model"]:
        report["ceiling"] = yield _ceiling(reactor, options, say, source)

    say()
    say(TABLE_HEADER)

    @defer.inlineCallbacks
    def probe(n):
        if report["runs"] and options["pause"]:  # let the server settle
            yield task.deferLater(reactor, options["pause"], lambda: None)
        if report["runs"] and options["server-pid"] is not None:
            # A probe that overloaded the server can leave it decoding the
            # audio its streams sent: the next probe must not pay for that.
            pid = options["server-pid"]
            waited = yield wait_until_idle(reactor, lambda: process_cpu_seconds(pid))
            if waited > 1.5 * IDLE_WINDOW:
                say("(waited %.1f s for the server to go idle)" % (waited,))
        run = yield Run(reactor, options, workload, n).go()
        report["runs"].append(run)
        say(table_row(run))
        return run["passed"]

    if options["find-max"]:
        best, tried = yield find_max(probe, options["streams"], options["max-streams"])
        report["find_max"] = {"max_streams": best, "p95_ms": options["p95-ms"],
                              "probes": [{"streams": n, "passed": p} for n, p in tried]}
    else:
        yield probe(options["streams"])

    say()
    for run in report["runs"]:
        for line in run_details(run):
            say(line)
    transport = framing
    if report["find_max"] is not None:
        best = report["find_max"]["max_streams"]
        line = "bench: find-max %s max N=%d (every stream kept up, p95 <= %g ms%s)" % (
            transport, best, options["p95-ms"],
            ", the --max-streams limit" if best == options["max-streams"] else "")
        ceiling_max = (report["ceiling"] or {}).get("max_streams")
        if ceiling_max is not None:
            report["find_max"]["ceiling_max_streams"] = ceiling_max
            ratio = best / ceiling_max if ceiling_max else None
            report["find_max"]["server_over_ceiling"] = (
                None if ratio is None else round(ratio, 3))
            line += " ceiling max N=%d%s server/ceiling %s" % (
                ceiling_max, " (limit)" if ceiling_max == options["max-streams"] else "",
                "-" if ratio is None else "%.2f" % ratio)
        at_best = [r for r in report["runs"] if r["streams"] == best]
        if at_best:
            say(summary_line(at_best[-1], transport))
        report["summary"] = line
    else:
        report["summary"] = summary_line(report["runs"][-1], transport)
    say(report["summary"])
    report["finished_at"] = datetime.datetime.now(datetime.timezone.utc).isoformat()
    if options["json"]:
        with open(options["json"], "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
    return report


@defer.inlineCallbacks
def _ceiling(reactor, options, say, source):
    """Time the model in-process, before any load: at N, or its own max N,
    every stream decoding source, as the load's streams send it.  As in the
    server, the steps run on a dedicated thread."""
    from twisted.internet.threads import deferToThreadPool
    from twisted.python.threadpool import ThreadPool

    ceiling = Ceiling(options["ceiling-model"], options["ceiling-device"],
                      options["ceiling-seconds"], options["ceiling-threads"],
                      options["ceiling-precision"], options["p95-ms"], options["keep-up-ms"],
                      options["chunk-ms"], options["stagger"], source)
    pool = ThreadPool(1, 1, "bench-ceiling")
    pool.start()
    section = {"model": options["ceiling-model"], "device": options["ceiling-device"],
               "precision": options["ceiling-precision"],
               "seconds": options["ceiling-seconds"], "threads": options["ceiling-threads"],
               "probes": [], "max_streams": None}
    say()
    say("ceiling: %s driven in-process on %s in %s with %s torch threads "
        "(parakeet.measuring.ceiling) on the load's audio, the server idle"
        % (options["ceiling-model"], options["ceiling-device"],
           options["ceiling-precision"] or "its default precision",
           options["ceiling-threads"] or "the default number of"))

    @defer.inlineCallbacks
    def probe(n):
        result = yield deferToThreadPool(reactor, pool, ceiling.measure, n)
        section["probes"].append(result)
        for line in ceiling_lines(result):
            say(line)
        return result["passed"]

    try:
        if options["find-max"]:
            best, _ = yield find_max(probe, options["streams"], options["max-streams"])
            section["max_streams"] = best
            section["lockstep_max_streams"] = max(
                [p["streams"] for p in section["probes"] if p["fits"]], default=0)
            say("ceiling max N=%d (paced in-process: every result within --keep-up-ms, "
                "p95 latency <= --p95-ms%s); lockstep: the largest N probed whose p95 "
                "step fits in one chunk was %d"
                % (best, ", the --max-streams limit" if best == options["max-streams"] else "",
                   section["lockstep_max_streams"]))
        else:
            yield probe(options["streams"])
        yield deferToThreadPool(reactor, pool, ceiling.close)
    finally:
        pool.stop()
    return section


def exit_code(report):
    """0 once a measurement was made; 1 when no stream of any run could open."""
    return 0 if any(run["opened"] for run in report["runs"]) else 1


def main(options, argv=None):
    """``parakeet-server bench``: run the reactor until the bench is done."""
    from twisted.internet import reactor

    command = ["parakeet-server"] + list(sys.argv[1:] if argv is None else argv)
    outcome = {}

    def done(report):
        outcome["code"] = exit_code(report)

    def failed(failure):
        sys.stderr.write("parakeet-server bench: %s\n" % (failure.getErrorMessage(),))
        outcome["code"] = 1

    def start():
        d = bench(reactor, options, command=command)
        d.addCallbacks(done, failed)
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(start)
    reactor.run()
    return outcome.get("code", 1)
