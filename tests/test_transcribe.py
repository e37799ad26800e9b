"""
``parakeet-server transcribe`` against a live server on loopback: the
library function with the tiny model, and the command itself, run as a child
process, with the demo model on held-out speech.
"""

import io
import os
import re
import sys

import numpy as np
from twisted.internet import defer, protocol, reactor, utils
from twisted.python import usage
from twisted.trial import unittest

from parakeet.clients import transcribe
from parakeet.clients.audiofiles import AudioSource
from parakeet.training import corpus

from .support.models import HELDOUT, WER_BOUND, demo_engine, speechlike
from .support.servers import ServerTestMixin, wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: One utterance as the command prints it.
UTTERANCE = re.compile(r"^\[(\d+\.\d\d)-(\d+\.\d\d)\] (\S.*)$")


class TranscribeTests(ServerTestMixin):

    @defer.inlineCallbacks
    def test_prints_partials_and_the_final_transcript(self):
        self.start_server()
        # 8 kHz audio: the server is told the rate and resamples it.
        samples = speechlike(3, 2.0)[::2].copy()
        source = AudioSource(samples.astype(np.float32), 8000, "test audio")
        out = io.StringIO()
        text = yield transcribe.transcribe(reactor, self.address(), source, speed=20.0,
                                           out=out, partials=True)
        lines = out.getvalue().splitlines()
        self.assertEqual(lines[-1], text)
        self.assertTrue(text)
        partials = lines[:-1]
        self.assertTrue(partials)
        for line in partials:
            self.assertTrue(line.startswith("... "), line)
        # Each partial is a prefix of what follows it.
        shown = [line[4:] for line in partials] + [text]
        for before, after in zip(shown, shown[1:]):
            self.assertTrue(after.startswith(before), (before, after))

    @defer.inlineCallbacks
    def test_as_fast_as_the_server_reads(self):
        # 30 s of audio sent at once, held back only by the server's flow
        # control (it stops reading past --max-backlog-seconds).
        self.start_server("--max-backlog-seconds", "2")
        source = AudioSource(speechlike(5, 30.0), 16000, "test audio")
        final = yield transcribe.stream(reactor, self.address(), source, pace=None)
        self.assertTrue(final["is_final"])
        self.assertEqual(final["audio_ms"], 30000.0)

    @defer.inlineCallbacks
    def test_server_error(self):
        # A full server answers the handshake with an error: the command
        # reports it instead of streaming.
        self.start_server("--max-num-streams", "1")
        first = yield self.connect()
        yield first.next(lambda m: m["type"] == "hello")
        source = AudioSource(speechlike(4, 0.5), 16000, "test audio")
        d = transcribe.transcribe(reactor, self.address(), source, out=io.StringIO())
        failure = yield self.assertFailure(d, RuntimeError)
        self.assertIn("No free streaming state", str(failure))


class TCPTranscribeTests(TranscribeTests, unittest.TestCase):
    transport = "tcp"


class WebSocketTranscribeTests(TranscribeTests, unittest.TestCase):
    transport = "ws"


class OptionsTests(unittest.TestCase):

    def parse(self, *argv):
        options = transcribe.Options()
        options.parseOptions(list(argv))
        return options

    def test_defaults(self):
        o = self.parse()
        self.assertEqual((o["files"], o["url"], o["pace"], o["token"], o["trust"],
                          o["partials"]),
                         ([transcribe.DEMO_SAMPLE], "ws://127.0.0.1:8000", 1.0, None, None, 0))
        self.assertEqual(o["wait"], 60.0)

    def test_values(self):
        o = self.parse("--url", "wss://h:1/ws", "--token", "t0k", "--trust", "ca.pem", "-p",
                       "a.wav", "b.mp3")
        self.assertEqual((o["files"], o["url"], o["token"], o["trust"], o["partials"]),
                         (["a.wav", "b.mp3"], "wss://h:1/ws", "t0k", "ca.pem", 1))
        self.assertEqual(self.parse("--fast")["pace"], None)
        self.assertEqual(self.parse("--realtime")["pace"], 1.0)
        self.assertEqual(self.parse("--speed", "4")["pace"], 4.0)

    def test_bad_values(self):
        for argv in (["--speed", "0"], ["--speed", "x"], ["--fast", "--realtime"],
                     ["--fast", "--speed", "2"], ["--bogus"], ["--wait", "-1"]):
            self.assertRaises(usage.UsageError, self.parse, *argv)


class _Terminal(protocol.ProcessProtocol):
    """A child on a pseudo-terminal: what it wrote, and its exit status."""

    def __init__(self):
        self.output = b""
        self.ended = defer.Deferred()

    def childDataReceived(self, fd, data):
        self.output += data

    def processEnded(self, reason):
        self.ended.callback(reason.value.exitCode)


def write_clip(path, names, rate=16000, channels=1, silence=0.0, **options):
    """Held-out clips one after another, at rate, as path (its format from
    its extension); (seconds, the words spoken)."""
    import soundfile
    import soxr

    rows = {row["audio_filepath"]: row
            for row in corpus.read_manifest(os.path.join(HELDOUT, "manifest.json"))}
    parts, words = [], []
    for name in names:
        audio, clip_rate = soundfile.read(os.path.join(HELDOUT, name), dtype="float32")
        parts += [audio, np.zeros(int(silence * clip_rate), dtype=np.float32)]
        words.append(rows[name]["text"].replace(corpus.EOU, ""))
    audio = np.concatenate(parts)
    if rate != clip_rate:
        audio = soxr.resample(audio, clip_rate, rate).astype(np.float32)
    soundfile.write(path, np.repeat(audio[:, None], channels, axis=1), rate, **options)
    return len(audio) / rate, " ".join(words)


class CommandTests(ServerTestMixin, unittest.TestCase):
    """The command as a child process, the demo model on held-out speech."""

    transport = "ws"

    def start(self, *flags):
        return self.start_server(*flags, engine=demo_engine())

    def command(self, *argv):
        """Run the command; fires with (stdout, stderr, exit status)."""
        env = dict(os.environ, PYTHONPATH=ROOT, PYTHONUNBUFFERED="1")
        return utils.getProcessOutputAndValue(
            sys.executable, ["-m", "parakeet", "transcribe"] + list(argv), env=env)

    def files(self):
        """Three files of the same sentences in different formats and rates:
        {path: (seconds, words)}."""
        base = os.path.abspath(self.mktemp())
        return {
            # A 44.1 kHz stereo WAV: the rate is declared, the channels mixed.
            base + "-44k.wav": write_clip(base + "-44k.wav", ["00013.flac"], 44100,
                                          channels=2, subtype="PCM_16"),
            base + ".mp3": write_clip(base + ".mp3", ["00009.flac"], 16000, format="MP3",
                                      compression_level=0.0, bitrate_mode="CONSTANT"),
            # 96 kHz is more than the server takes: converted by the client.
            base + "-96k.flac": write_clip(base + "-96k.flac", ["00007.flac"], 96000),
        }

    def assertTranscripts(self, out, files, headers=True):
        """out: each file's header and its utterance lines, within its audio
        (one file without a header: headers False)."""
        lines = out.decode().splitlines()
        pairs = []
        for path, (seconds, words) in files.items():
            start = lines.index("==> %s <==" % (path,)) if headers else -1
            heard = []
            for line in lines[start + 1:]:
                if line.startswith("==> "):
                    break
                match = UTTERANCE.match(line)
                self.assertIsNotNone(match, line)
                begin, end = float(match.group(1)), float(match.group(2))
                self.assertTrue(0 <= begin <= end <= seconds, (line, seconds))
                heard.append(match.group(3))
            self.assertTrue(heard, (path, lines))
            pairs.append((words, " ".join(heard)))
        sys.stderr.write("[%s] " % ("; ".join("%r as %r" % pair for pair in pairs),))
        self.assertLessEqual(corpus.word_error_rate(pairs), WER_BOUND, pairs)

    @defer.inlineCallbacks
    def test_several_files_fast(self):
        self.start()
        files = self.files()
        out, err, status = yield self.command("--url", self.address(), "--fast", *files)
        self.assertEqual((status, err), (0, b""), out)
        self.assertTranscripts(out, files)

    @defer.inlineCallbacks
    def test_unreadable_file(self):
        # It says so in one line, goes on with the other files, and exits 2.
        self.start()
        files = self.files()
        missing = os.path.abspath(self.mktemp() + ".wav")
        garbage = os.path.abspath(self.mktemp() + ".flac")
        with open(garbage, "wb") as f:
            f.write(b"not audio at all" * 100)
        out, err, status = yield self.command("--url", self.address(), "--fast", missing,
                                              garbage, *files)
        self.assertEqual(status, 2, (out, err))
        lines = err.decode().splitlines()
        self.assertEqual(len(lines), 2, lines)
        self.assertEqual(lines[0], "parakeet-server transcribe: cannot read %s: "
                                   "no such file or directory" % (missing,))
        self.assertTrue(lines[1].startswith("parakeet-server transcribe: cannot read %s: "
                                            % (garbage,)), lines)
        self.assertTranscripts(out, files)

    @defer.inlineCallbacks
    def test_server_error(self):
        # A full server: one line with the server's error, and exit status 1.
        self.start("--max-num-streams", "1")
        holder = yield self.connect()
        yield holder.next(lambda m: m["type"] == "hello")
        path = os.path.abspath(self.mktemp() + ".wav")
        write_clip(path, ["00009.flac"])
        out, err, status = yield self.command("--url", self.address(), "--fast", path)
        self.assertEqual((status, out), (1, b""), err)
        self.assertEqual(err.decode(), "parakeet-server transcribe: %s: the server says: "
                                       "No free streaming state available.\n" % (path,))

    @defer.inlineCallbacks
    def test_error_during_the_stream(self):
        # The server cuts a stream past --max-stream-seconds: the utterances
        # before the cut are printed, then the error, and the status is 1.
        self.start("--max-stream-seconds", "3")
        path = os.path.abspath(self.mktemp() + ".wav")
        write_clip(path, ["00013.flac", "00007.flac"])
        out, err, status = yield self.command("--url", self.address(), "--fast", path)
        self.assertEqual(status, 1, (out, err))
        lines = err.decode().splitlines()
        self.assertEqual(len(lines), 1, lines)
        self.assertTrue(lines[0].startswith("parakeet-server transcribe: %s: the server "
                                            "says: " % (path,)), lines)
        self.assertIn("3", lines[0])

    @defer.inlineCallbacks
    def test_token(self):
        # --token over WebSocket (a header) and TCP (an auth message first).
        tokens = os.path.abspath(self.mktemp())
        with open(tokens, "w") as f:
            f.write("right-token\n")
        self.start("--auth-tokens", tokens)
        path = os.path.abspath(self.mktemp() + ".wav")
        seconds, words = write_clip(path, ["00009.flac"])
        for address in (self.address(), "tcp://127.0.0.1:%d" % (self.ports["TCP clients"],)):
            out, err, status = yield self.command("--url", address, "--fast", "--token",
                                                  "right-token", path)
            self.assertEqual((status, err), (0, b""), out)
            self.assertRegex(out.decode(), UTTERANCE.pattern[:-1] + r"\n$")
            out, err, status = yield self.command("--url", address, "--fast", "--token",
                                                  "wrong-token", path)
            self.assertEqual((status, out), (1, b""), err)
            lines = err.decode().splitlines()
            self.assertEqual(len(lines), 1, lines)
            self.assertIn("the server says: authentication failed", lines[0])

    @defer.inlineCallbacks
    def test_trust(self):
        # wss:// to a server with a self-signed certificate: refused unless
        # --trust names it.
        from .support.servers import make_certificate
        from .support.servers import ssl_endpoint

        cert, key = make_certificate(self.mktemp())
        self.start("--listen-ws", ssl_endpoint(cert, key))
        address = "wss://localhost:%d/" % (self.ports["WebSocket clients"],)
        path = os.path.abspath(self.mktemp() + ".wav")
        write_clip(path, ["00009.flac"])
        out, err, status = yield self.command("--url", address, "--fast", "--trust", cert,
                                              path)
        self.assertEqual((status, err), (0, b""), out)
        self.assertRegex(out.decode(), UTTERANCE.pattern[:-1] + r"\n$")
        out, err, status = yield self.command("--url", address, "--fast", path)
        self.assertEqual((status, out), (1, b""), err)
        lines = err.decode().splitlines()
        self.assertEqual(len(lines), 1, lines)
        self.assertIn("cannot connect to %s" % (address,), lines[0])

    @defer.inlineCallbacks
    def test_no_server(self):
        # Nothing listens at the address: one line, exit status 1.
        port = reactor.listenTCP(0, protocol.Factory(), interface="127.0.0.1")
        address = "ws://127.0.0.1:%d" % (port.getHost().port,)
        yield port.stopListening()
        out, err, status = yield self.command("--url", address, "--wait", "0",
                                              transcribe.DEMO_SAMPLE)
        self.assertEqual((status, out), (1, b""), err)
        lines = err.decode().splitlines()
        self.assertEqual(len(lines), 1, lines)
        self.assertIn("cannot connect to %s" % (address,), lines[0])
        # Waiting for it: a notice, then the same error once the wait is over.
        out, err, status = yield self.command(transcribe.DEMO_SAMPLE, "--url", address,
                                              "--wait", "1")
        self.assertEqual((status, out), (1, b""), err)
        lines = err.decode().splitlines()
        self.assertEqual(lines[0], "waiting up to 1 s for the server at %s to start..."
                         % (address,))
        self.assertIn("cannot connect to %s" % (address,), lines[1])

    @defer.inlineCallbacks
    def test_waits_for_a_loading_server(self):
        # The quick start: the server is started, then the client at once,
        # while the model loads.  The client says it waits, and transcribes
        # once the server is ready.
        import threading

        from parakeet.server import tap

        release = threading.Event()
        self.addCleanup(release.set)
        engine = demo_engine()
        settings = (engine.vad, engine.endpointing_ms)
        self.addCleanup(setattr, engine, "vad", settings[0])
        self.addCleanup(setattr, engine, "endpointing_ms", settings[1])
        self.patch(tap, "load_engine", lambda config: release.wait(30) and engine)
        options = tap.Options()
        options.parseOptions(["--host", "127.0.0.1", "--port", "0", "--ws-port", "0"])
        server = tap.makeService(options, reactor)
        refusals = []
        self.patch(server.registry.metrics, "refused", refusals.append)
        server.startService()
        self.addCleanup(server.stopService)
        address = "ws://127.0.0.1:%d" % (
            server.getServiceNamed("WebSocket clients").port.getHost().port,)
        path = os.path.abspath(self.mktemp() + ".wav")
        seconds, words = write_clip(path, ["00009.flac"])
        running = self.command(path, "--fast", "--url", address)
        yield wait_for(lambda: "loading" in refusals)
        release.set()
        out, err, status = yield running
        self.assertEqual((status, err.decode().splitlines()), (0, [
            "waiting up to 60 s for the server at %s to start..." % (address,)]), out)
        self.assertTranscripts(out, {"": (seconds, words)}, headers=False)

    @defer.inlineCallbacks
    def test_nothing_heard(self):
        # A stream in which nothing was recognised says so (here: 5 ms of
        # audio, less than one frame).
        self.start()
        path = os.path.abspath(self.mktemp() + ".wav")
        import soundfile

        soundfile.write(path, np.zeros(80, np.float32), 16000)
        out, err, status = yield self.command("--url", self.address(), "--fast", path)
        self.assertEqual((status, out, err), (0, b"(no speech recognised)\n", b""))

    @defer.inlineCallbacks
    def test_on_a_terminal(self):
        # On a terminal the utterance under way is redrawn in place, and a
        # long file gets a progress bar.
        self.start()
        path = os.path.abspath(self.mktemp() + ".wav")
        seconds, words = write_clip(path, ["00010.flac", "00013.flac", "00014.flac"],
                                    silence=0.5)
        self.assertGreater(seconds, transcribe.LONG_FILE_SECONDS)
        child = _Terminal()
        env = dict(os.environ, PYTHONPATH=ROOT, PYTHONUNBUFFERED="1", COLUMNS="100")
        process = reactor.spawnProcess(
            child, sys.executable, [sys.executable, "-m", "parakeet", "transcribe", "--url",
                                    self.address(), "--fast", path], env=env, usePTY=True)

        def kill():
            if not child.ended.called:
                process.signalProcess("KILL")
            return child.ended

        self.addCleanup(kill)
        status = yield child.ended
        output = child.output.decode()
        self.assertEqual(status, 0, output)
        self.assertIn("\r", output)
        self.assertIn("\x1b[K", output)
        self.assertRegex(output, r"100%% \[#{24}\] %d/%d s" % (round(seconds), round(seconds)))
        # What stays on the screen: the utterances, one per line.
        screen = [line.rsplit("\r", 1)[-1].replace("\x1b[K", "")
                  for line in output.replace("\r\n", "\n").split("\n")]
        utterances = [line for line in screen if line]
        for line in utterances:
            self.assertRegex(line, UTTERANCE.pattern)
        heard = " ".join(UTTERANCE.match(line).group(3) for line in utterances)
        self.assertLessEqual(corpus.word_error_rate([(words, heard)]), WER_BOUND,
                             (words, heard))
