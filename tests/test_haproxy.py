"""
Scale-out behind HAProxy: conf/haproxy.cfg, run for real in front of two
real daemons (child processes of ``parakeet-server serve`` with the tiny
model), and conf/supervisord.conf, which starts the daemons it names.

The HAProxy the test runs is the shipped conf/haproxy.cfg with only what ties
it to a machine changed (:func:`haproxy_config`): its ``global`` section
(process, logging and the admin socket), the addresses and ports, two of its
server lines, the per-server maxconn (the daemons' --max-num-streams) and the
check intervals (shortened, so that the test does not wait seconds for the
agent).  Timeouts, balancing, the checks and the agent are the shipped ones.
"""

import configparser
import csv
import io
import os
import random
import re
import shlex
import shutil
import socket
import sys

from twisted.internet import defer, reactor
from twisted.trial import unittest

from parakeet.clients import connection
from parakeet.server import tap

from .support.models import (
    offline_tokens, quantized, shared_tiny_engine, speechlike, tiny_model_path)
from .support.servers import BIN, ROOT, read_line, read_status, spawn, wait_for

#: Debian installs it in /usr/sbin, which a user's PATH may lack.
HAPROXY = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/usr/local/sbin")
HAPROXY_CFG = os.path.join(ROOT, "conf", "haproxy.cfg")
SUPERVISORD_CONF = os.path.join(ROOT, "conf", "supervisord.conf")

#: The test's daemons: stream slots each, and seconds to drain on SIGTERM.
SLOTS = 4
DRAIN_SECONDS = 60
#: The test's check intervals (the shipped ones are 2 s and 1 s).
CHECK_INTER = "200ms"
AGENT_INTER = "100ms"

_SERVER_LINE = re.compile(
    r"^(?P<indent>\s*)server (?P<name>\S+) (?P<host>[^\s:]+):\+(?P<offset>\d+) "
    r"port (?P<check>\d+) agent-port (?P<agent>\d+)\s*$")


def sections(text):
    """The config's sections: [(header line, [lines])], comments included."""
    found = []
    for line in text.splitlines():
        if line and not line[0].isspace() and not line.startswith("#"):
            found.append((line, []))
        elif found:
            found[-1][1].append(line)
    return found


def server_lines(text, backend="parakeet"):
    """The server lines of backend, as _SERVER_LINE matches."""
    for header, lines in sections(text):
        if header.split() == ["backend", backend]:
            return [m for m in map(_SERVER_LINE.match, lines) if m]
    raise AssertionError("no backend %s in %s" % (backend, HAPROXY_CFG))


def haproxy_config(text, bind, daemons, socket_path, slots):
    """The shipped config text made to run here.

    bind: {shipped bind port: (host, port)}; daemons: one dict per daemon
    with its "offset" (its stream ports minus the bind ports) and "agent"
    port, taking the place of the first server lines in order (the others
    are left out); socket_path: the admin socket; slots: --max-num-streams."""
    out = []
    for header, lines in sections(text):
        if header == "global":
            out += [header,
                    "    log stdout format raw local0",
                    "    stats socket %s mode 600 level admin" % (socket_path,),
                    "    maxconn 200"]
            continue
        out.append(header)
        servers = list(daemons)
        for line in lines:
            bound = re.match(r"^(\s*)bind :(\d+)\s*$", line)
            server = _SERVER_LINE.match(line)
            if bound:
                host, port = bind[int(bound.group(2))]
                line = "%sbind %s:%d" % (bound.group(1), host, port)
            elif server:
                if not servers:
                    continue
                daemon = servers.pop(0)
                line = "%sserver %s 127.0.0.1:+%d port %d agent-port %d" % (
                    server.group("indent"), server.group("name"), daemon["offset"],
                    daemon["agent"], daemon["agent"])
            elif line.lstrip().startswith("default-server"):
                line = re.sub(r"\binter \S+", "inter " + CHECK_INTER, line)
                line = re.sub(r"\bagent-inter \S+", "agent-inter " + AGENT_INTER, line)
                line = re.sub(r"\bmaxconn \d+", "maxconn %d" % (slots,), line)
            out.append(line)
        if header.startswith("backend") and servers:
            raise AssertionError("fewer server lines than daemons in %s" % (HAPROXY_CFG,))
    return "\n".join(out) + "\n"


def free_ports(count, low=20000, high=32000):
    """count consecutive loopback ports free now, below the ephemeral range
    (where the ports other tests' "port 0" listeners get are)."""
    for _ in range(200):
        first = random.randrange(low, high - count)
        taken = []
        try:
            for port in range(first, first + count):
                s = socket.socket()
                taken.append(s)
                s.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            for s in taken:
                s.close()
        return list(range(first, first + count))
    raise AssertionError("no %d free consecutive ports" % (count,))


def admin(socket_path, command):
    """HAProxy's answer to one admin socket command."""
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(5)
    try:
        s.connect(socket_path)
        s.sendall(command.encode() + b"\n")
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return data.decode()
            data += chunk
    finally:
        s.close()


def server_stats(socket_path, backend="parakeet"):
    """{server name: its row of ``show stat``} for backend's servers."""
    text = admin(socket_path, "show stat").lstrip("# ")
    return {row["svname"]: row for row in csv.DictReader(io.StringIO(text))
            if row["pxname"] == backend and row["svname"] not in ("FRONTEND", "BACKEND")}


class ConfigTests(unittest.TestCase):
    """conf/haproxy.cfg and conf/supervisord.conf describe the same daemons."""

    def programs(self):
        parser = configparser.ConfigParser(interpolation=None)
        parser.read(SUPERVISORD_CONF)
        return {name.split(":", 1)[1]: parser[name] for name in parser.sections()
                if name.startswith("program:")}

    def test_supervisord_programs(self):
        programs = self.programs()
        self.assertEqual(sorted(programs), ["parakeet-gpu%d" % n for n in range(4)])
        for n, name in enumerate(sorted(programs)):
            program = programs[name]
            argv = shlex.split(program["command"])
            self.assertEqual(os.path.basename(argv[0]), "parakeet-server")
            self.assertEqual(argv[1], "serve")
            options = tap.Options()
            options.parseOptions(argv[2:])   # every flag valid
            self.assertEqual(options["device"], "cuda")
            self.assertIn('CUDA_VISIBLE_DEVICES="%d"' % (n,), program["environment"])
            self.assertEqual(program["stopsignal"], "TERM")
            # supervisord waits for the drain before it kills.
            self.assertGreater(int(program["stopwaitsecs"]), options["drain-seconds"])
        ports = [tuple(self.flags(p)[k] for k in ("port", "ws-port", "status-port",
                                                   "agent-port", "http-port"))
                 for _, p in sorted(programs.items())]
        every = [port for daemon in ports for port in daemon]
        self.assertEqual(len(set(every)), len(every), ports)

    def flags(self, program):
        options = tap.Options()
        options.parseOptions(shlex.split(program["command"])[2:])
        return options

    def test_haproxy_servers_are_the_programs(self):
        with open(HAPROXY_CFG) as f:
            text = f.read()
        programs = self.programs()
        frontend = dict(sections(text))["frontend parakeet"]
        binds = sorted(int(m.group(1)) for m in
                       (re.match(r"^\s*bind :(\d+)\s*$", line) for line in frontend) if m)
        # The ports one server listens on by default.
        self.assertEqual(binds, [8000, 8765])
        servers = server_lines(text)
        self.assertEqual(len(servers), 8)
        default = [line for line in dict(sections(text))["defaults"]
                   if line.lstrip().startswith("default-server")]
        self.assertEqual(len(default), 1)
        for server in servers:
            # Every host runs the same programs: hostN-gpuM is parakeet-gpuM.
            program = programs["parakeet-" + server.group("name").split("-")[1]]
            flags = self.flags(program)
            offset = int(server.group("offset"))
            self.assertEqual((8765 + offset, 8000 + offset),
                             (flags["port"], flags["ws-port"]), server.group(0))
            self.assertEqual(int(server.group("check")), flags["agent-port"])
            self.assertEqual(int(server.group("agent")), flags["agent-port"])
            self.assertIn("maxconn %d " % (flags["max-num-streams"],), default[0] + " ")

    def test_haproxy_accepts_it(self):
        if HAPROXY is None:
            raise unittest.SkipTest("needs haproxy (apt-get install haproxy), not installed")
        from twisted.internet import utils

        def check(path):
            d = utils.getProcessOutputAndValue(HAPROXY, ["-c", "-f", path],
                                               env=os.environ)
            return d.addCallback(lambda r: self.assertEqual(r[2], 0, r[0] + r[1]))

        with open(HAPROXY_CFG) as f:
            text = f.read()
        ports = dict(zip((8765, 8000, 8404), (("127.0.0.1", p) for p in (1, 2, 3))))
        with open("haproxy.cfg", "w") as f:
            f.write(haproxy_config(text, ports, [{"offset": 10, "agent": 11}] * 2,
                                   os.path.abspath("admin.sock"), SLOTS))
        return defer.gatherResults([check(HAPROXY_CFG), check("haproxy.cfg")])


class ScaleOutTests(unittest.TestCase):
    """Two daemons behind HAProxy, as conf/haproxy.cfg sets it up.

    Starting them costs two model loads (the CPU's for a good part of half a
    minute), so one cluster serves every scenario, in turn: loading, streams
    spread over both, one daemon full, one daemon draining."""

    timeout = 400

    def setUp(self):
        if HAPROXY is None:
            raise unittest.SkipTest("needs haproxy (apt-get install haproxy), not installed")

    # the cluster

    @defer.inlineCallbacks
    def start_cluster(self):
        # HAProxy adds a server's "+offset" to the port the client connected
        # to, so the daemons' ports are laid out from the frontend's.
        ports = free_ports(7)
        self.lb = {"tcp": ports[0], "ws": ports[1]}
        self.daemons = []
        for i in range(2):
            offset = 2 + 2 * i
            proc, transport = spawn(self, [
                os.path.join(BIN, "parakeet-server"), "serve", "--model", tiny_model_path(),
                "--device", "cpu", "--host", "127.0.0.1",
                "--port", str(ports[0] + offset), "--ws-port", str(ports[1] + offset),
                "--status-port", "0", "--agent-port", "0",
                "--max-num-streams", str(SLOTS), "--drain-seconds", str(DRAIN_SECONDS),
                # A stream's whole backlog is read at once (the drain test's).
                "--max-backlog-seconds", "60"])
            self.daemons.append({"proc": proc, "transport": transport, "offset": offset,
                                 "name": "host1-gpu%d" % (i,), "tcp": ports[0] + offset})
        for daemon in self.daemons:
            for what, key in (("status checks", "status"), ("HAProxy agent checks", "agent")):
                match = yield daemon["proc"].wait_for_output(
                    b"listening for " + what.encode() + rb" on 127\.0\.0\.1:(\d+)")
                daemon[key] = int(match.group(1))
        with open(HAPROXY_CFG) as f:
            shipped = f.read()
        self.socket = os.path.abspath("haproxy.sock")
        with open("haproxy.cfg", "w") as f:
            f.write(haproxy_config(
                shipped, {8765: ("127.0.0.1", ports[0]), 8000: ("127.0.0.1", ports[1]),
                          8404: ("127.0.0.1", ports[6])},
                self.daemons, self.socket, SLOTS))
        self.haproxy, _ = spawn(self, [HAPROXY, "-f", os.path.abspath("haproxy.cfg"), "-db"])
        yield wait_for(lambda: os.path.exists(self.socket) or self.haproxy.ended.called)
        if self.haproxy.ended.called:
            self.fail("haproxy exited: %s" % (self.haproxy.err.decode(),))

    def stats(self):
        return server_stats(self.socket)

    def ready(self, daemon):
        return b"ready: serving " in daemon["proc"].out

    @defer.inlineCallbacks
    def connected(self):
        """Each daemon's connected_streams, from its status port."""
        counts = []
        for daemon in self.daemons:
            status = yield read_status(daemon["status"])
            counts.append(status["connected_streams"])
        return counts

    def wait_for_haproxy(self, predicate, timeout=60):
        """Until predicate({server: its stats row}) holds."""
        seen = []

        def check():
            stats = self.stats()
            view = {name: (row["status"], row["weight"], row["last_agt"])
                    for name, row in sorted(stats.items())}
            if not seen or seen[-1] != view:
                seen.append(view)
            return predicate(stats)

        def failed(reason):
            reason.trap(AssertionError)
            raise AssertionError("HAProxy's servers went through %r" % (seen[-20:],))

        return wait_for(check, timeout=timeout, interval=0.02).addErrback(failed)

    def all_free(self):
        """Until HAProxy has heard from every agent that all its slots are free."""
        return self.wait_for_haproxy(lambda stats: all(
            stats[d["name"]]["status"] == "UP" and stats[d["name"]]["weight"] == "100"
            for d in self.daemons))

    @defer.inlineCallbacks
    def open_streams(self, count, address=None):
        """count streams through HAProxy (TCP and WebSocket in turn), or to
        address; fires with the clients once each has its first message."""
        addresses = [address or ("tcp://127.0.0.1:%d" % (self.lb["tcp"],) if i % 2 == 0
                                 else "ws://127.0.0.1:%d" % (self.lb["ws"],))
                     for i in range(count)]
        streams = yield defer.gatherResults(
            [connection.connect(reactor, a) for a in addresses], consumeErrors=True)
        first = yield defer.gatherResults([c.next() for c in streams], consumeErrors=True)
        self.assertEqual([m["type"] for m in first], ["hello"] * count, first)
        return streams

    @defer.inlineCallbacks
    def finish(self, streams, audio, expected):
        """Send each stream audio and its end; each gets the whole transcript."""
        for stream in streams:
            stream.send_audio(audio, final=True)
        for stream in streams:
            final = yield stream.final()
            yield stream.closed
            self.assertEqual([t for r in stream.results() for t in r["token_ids"]], expected)
            self.assertEqual(final["audio_ms"], len(audio) / 16)

    @defer.inlineCallbacks
    def test_scale_out(self):
        started = reactor.seconds()
        yield self.start_cluster()
        audio = quantized(speechlike(70, 1.2))
        engine = shared_tiny_engine()
        expected, _ = offline_tokens(engine, audio)
        self.assertTrue(expected)
        yield self.check_loading()
        sys.stderr.write("[two daemons and HAProxy up in %.1f s] "
                         % (reactor.seconds() - started,))
        yield self.check_spread(audio, expected)
        yield self.check_full(audio, expected)
        yield self.check_drain(audio, expected, engine)

    @defer.inlineCallbacks
    def check_loading(self):
        """While a daemon loads its model its agent says down, and HAProxy
        marks it DOWN; once it is ready, UP at full weight."""
        seen = {}

        def loading_or_ready(stats):
            for daemon in self.daemons:
                row = stats[daemon["name"]]
                if row["status"] == "DOWN (agent)" and "loading the model" in row["last_agt"]:
                    seen[daemon["name"]] = "%s, %s" % (row["status"], row["last_agt"])
            return all(d["name"] in seen or self.ready(d) for d in self.daemons)

        yield self.wait_for_haproxy(loading_or_ready)
        replies = []
        for daemon in self.daemons:
            replies.append((yield read_line(daemon["agent"])).decode())
        for reply in replies:
            self.assertIn(reply, ("down #loading the model\n",
                                  "up ready 100%% maxconn:%d\n" % (SLOTS,)))
        for daemon in self.daemons:
            yield daemon["proc"].wait_for_output(rb"ready: serving ")
        yield self.all_free()
        sys.stderr.write("[loading: HAProxy saw %s; agent replies %r] "
                         % (seen or "none (already loaded)", replies))

    @defer.inlineCallbacks
    def check_spread(self, audio, expected):
        """Streams opened at once through HAProxy spread over both daemons."""
        streams = yield self.open_streams(6)
        counts = yield self.connected()
        stats = self.stats()
        self.assertEqual(sum(counts), 6)
        self.assertEqual([int(stats[d["name"]]["scur"]) for d in self.daemons], counts)
        for count in counts:
            self.assertGreaterEqual(count, 1)
            self.assertLessEqual(count, SLOTS)
        sys.stderr.write("[6 streams through HAProxy: %d + %d] " % tuple(counts))
        yield self.finish(streams, audio, expected)
        yield self.all_free()

    @defer.inlineCallbacks
    def check_full(self, audio, expected):
        """A daemon whose slots are all taken by clients that did not come
        through HAProxy gets weight 0: new streams go to the other one."""
        first = self.daemons[0]
        direct, replies = [], []
        for _ in range(SLOTS):
            direct += yield self.open_streams(1, "tcp://127.0.0.1:%d" % (first["tcp"],))
            replies.append((yield read_line(first["agent"])).decode())
        self.assertEqual(replies, ["up ready %d%% maxconn:%d\n" % (100 * (SLOTS - n) // SLOTS,
                                                                   SLOTS)
                                   for n in range(1, SLOTS + 1)])
        yield self.wait_for_haproxy(lambda stats: stats[first["name"]]["weight"] == "0")
        row = self.stats()[first["name"]]
        through = yield self.open_streams(3)
        counts = yield self.connected()
        self.assertEqual(counts, [SLOTS, 3])
        sys.stderr.write("[daemon 1 full (agent %r, HAProxy: %s, weight %s): 3 new streams "
                         "through HAProxy: %d + %d] "
                         % (replies[-1], row["status"], row["weight"],
                            counts[0] - SLOTS, counts[1]))
        yield self.finish(direct + through, audio, expected)
        yield self.all_free()

    @defer.inlineCallbacks
    def check_drain(self, audio, expected, engine):
        """SIGTERM to a daemon with open streams: its agent says drain, new
        streams go to the other daemon, its own streams get their final
        results, it exits; the other daemon serves on throughout."""
        first, other = self.daemons
        streams = yield self.open_streams(4)
        counts = yield self.connected()
        self.assertGreaterEqual(counts[0], 1)
        # Enough audio that decoding it keeps the daemon draining for seconds,
        # many agent intervals.
        long_audio = quantized(speechlike(71, 3.0))
        long_expected, _ = offline_tokens(engine, long_audio)
        for stream in streams:
            for start in range(0, len(long_audio), 16000):
                stream.send_audio(long_audio[start:start + 16000])
            stream.send({"type": "ping"})
        # Answered in turn: the daemons have every sample before the SIGTERM.
        for stream in streams:
            yield stream.next(lambda m: m["type"] == "pong")
        first["transport"].signalProcess("TERM")

        yield self.wait_for_haproxy(
            lambda stats: stats[first["name"]]["status"].startswith("DRAIN"))
        row = self.stats()[first["name"]]
        reply = (yield read_line(first["agent"])).decode()
        self.assertEqual(reply, "drain #shutting down\n")
        status = yield read_status(first["status"])
        self.assertEqual(status["state"], "draining")
        # New streams, while it drains, go to the other daemon (the draining
        # one would refuse them with an error instead of a hello).
        new = yield self.open_streams(min(2, SLOTS - counts[1]))
        status = yield read_status(other["status"])
        self.assertEqual(status["connected_streams"], counts[1] + len(new))

        # The draining daemon's streams: an error saying so, then the whole
        # transcript of every sample they sent.
        def drained():
            return [s for s in streams
                    if "the server is shutting down: the stream was finalized" in s.errors()]

        yield wait_for(lambda: len(drained()) == counts[0])
        for stream in drained():
            final = yield stream.final()
            yield stream.closed
            self.assertEqual([t for r in stream.results() for t in r["token_ids"]],
                             long_expected)
            self.assertEqual(final["audio_ms"], len(long_audio) / 16)
        self.assertEqual((yield first["proc"].ended), 0)
        yield self.wait_for_haproxy(
            lambda stats: stats[first["name"]]["status"].startswith("DOWN"))
        down = self.stats()[first["name"]]["status"]

        # The other daemon's streams carry on, and it takes new ones.
        others = [s for s in streams if s not in drained()]
        for stream in others:
            self.assertEqual(stream.errors(), [])
            stream.close()
        for stream in others:
            yield stream.final()
            yield stream.closed
            self.assertEqual([t for r in stream.results() for t in r["token_ids"]],
                             long_expected)
        # (Once HAProxy has heard that it has free slots again.)
        yield self.wait_for_haproxy(lambda stats: stats[other["name"]]["weight"] != "0")
        last = yield self.open_streams(1)
        yield self.finish(new + last, audio, expected)
        drained_in = re.search(rb"drained \d+ streams in (\d+\.\d+) s", first["proc"].out)
        sys.stderr.write(
            "[SIGTERM to daemon 1 with %d + %d streams: agent %r, HAProxy: %s; "
            "%d new streams through HAProxy meanwhile: 0 + %d; drained in %s s, then "
            "HAProxy: %s] "
            % (counts[0], counts[1], reply, row["status"], len(new), len(new),
               drained_in.group(1).decode(), down))
