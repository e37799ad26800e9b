"""
The bench's load: N streams against a running server at once (:class:`Run`),
each sending the same audio (:class:`Workload`, encoded once for the wire:
:class:`Payloads`) on its own real-time schedule and timing what comes back
(:class:`BenchStream`), over the client connections of
:mod:`parakeet.clients.connection`; and the search for the most streams
that pass (:func:`find_max`).
"""

import base64
import ipaddress
import json
import resource
import time
from urllib.parse import parse_qs, urlsplit

from twisted.internet import defer

from .connection import HandshakeFailed, StreamClient, connect_tcp, connect_websocket
from .latency import milliseconds, result_latencies, spread
from .report import verdict
from .serverstats import ServerSampler

#: How many error messages a report quotes.
QUOTED_ERRORS = 5

#: Seconds to open a stream's TCP connection, and then its WebSocket
#: opening handshake.
CONNECT_TIMEOUT = 30


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


# the audio

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

def connect_stream(reactor, target, client):
    """Connect client (a StreamClient) to target; a Deferred that fires
    once the connection is open (over WebSocket, once the opening handshake
    is done), or fails if it cannot be made."""
    if target.transport == "tcp":
        return connect_tcp(reactor, target.host, target.port, client=client,
                           timeout=CONNECT_TIMEOUT)
    return connect_websocket(reactor, target.url, client=client, timeout=CONNECT_TIMEOUT,
                             handshake_timeout=CONNECT_TIMEOUT)


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
        self.client = None    #: its StreamClient, once it begins to connect
        self._pending = None  #: the next tick, or the wait for the final result
        self._timed_out = False

    def connect(self):
        self.connecting_at = self.run.clock()
        # Messages are not kept: a long run would hold every result.
        client = self.client = StreamClient(keep_messages=False)
        client.on_message = self.received
        client.on_unreadable = self.unreadable
        client.closed.addCallback(lambda _: self.lost())
        d = defer.maybeDeferred(self.run.connector, client)
        d.addErrback(self._cannot_connect)

    def _cannot_connect(self, failure):
        if failure.check(HandshakeFailed):
            self.errors.append("WebSocket handshake failed: %s %s"
                               % (failure.value.code, failure.value.reason or ""))
        else:
            self.errors.append("cannot connect: %s" % (failure.getErrorMessage(),))
        self._end()

    def unreadable(self, data):
        self.errors.append("unreadable message from the server: %r" % (data[:80],))

    def received(self, message):
        at = self.run.clock()
        kind = message.get("type")
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
            self.client.disconnect()
            return
        self.client.send_frame(*self.plan.config)
        self.start = self.run.clock()
        self._tick()

    def _tick(self):
        self._pending = None
        k = len(self.sent_at)
        frames = self.plan.steps[k]
        self.sent_at.append(self.run.clock())
        send = self.client.send_frame
        for data, binary in frames:
            send(data, binary)
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
        self.client.disconnect()

    def lost(self):
        if self._pending is not None and self._pending.active():
            self._pending.cancel()
        self._pending = None
        if self.opened and self.final_at is None and not self._timed_out:
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
            "hello_ms": milliseconds(self.hello_delay()),
            "ticks_sent": len(self.sent_at),
            "audio_seconds_sent": (round(self.plan.cumulative_ms[len(self.sent_at) - 1]
                                         / 1000.0, 3) if self.sent_at else 0.0),
            "results": len(self.results),
            "unmatched_results": len(latencies) - len(matched),
            "latency_ms": spread(matched, (50, 95)),
            "time_to_final_ms": milliseconds(ttf),
            "errors": list(self.errors),
        }


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
        self.connector = lambda client: connect_stream(reactor, options["target"], client)
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
            "latency_ms": spread(latencies),
            "time_to_final_ms": spread(finals, (50, 95)),
            "hello_ms": spread(hellos, (50, 95)),
            "errors": {"count": len(errors), "first": errors[:QUOTED_ERRORS]},
            "bench": {
                "lateness_ms": spread(lateness, (50, 99)),
                "behind": behind,
                "cpu_percent": round(100.0 * bench_cpu / wall, 1) if wall > 0 else None,
            },
            "server": server,
            "per_stream": per_stream,
        }
        run["passed"], run["verdict"] = verdict(run, options["p95-ms"])
        return run


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
