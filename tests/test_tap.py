"""
The command line, the twistd plugin and the service tree they build; the
server run for real as ``parakeet-server serve`` and ``twistd -n parakeet``.
"""

import io
import os
import re
import signal
import sys

from twisted.application.service import IServiceMaker
from twisted.internet import defer, reactor
from twisted.plugin import getPlugins
from twisted.python import usage
from twisted.trial import unittest

from parakeet import cli
from parakeet.checkpoints import MODEL_SIZES, ModelUnavailable, check_reachable
from parakeet.server import tap
from parakeet.training import corpus

from .support.models import shared_tiny_engine, speechlike, tiny_model_path
from .support.servers import BIN, ROOT, ServerTestMixin, free_ports, spawn, wait_for

FLAGS = ["--" + p[0] for p in tap.Options.optParameters]


class OptionsTests(unittest.TestCase):

    def parse(self, *argv):
        options = tap.Options()
        options.parseOptions(list(argv))
        return options

    def test_defaults(self):
        o = self.parse()
        self.assertEqual(
            (o["host"], o["port"], o["ws-port"], o["status-port"], o["model-size"],
             o["model"], o["device"], o["sample-rate"], o["max-num-streams"],
             o["max-stream-seconds"], o["max-message-bytes"], o["max-batch"],
             o["precision"]),
            ("0.0.0.0", 8765, 8000, None, "small", None, None, 16000, 100, 300.0,
             1 << 20, 100, None))

    def test_values(self):
        o = self.parse("--port", "1", "--ws-port", "2", "--status-port", "3",
                       "--model-size", "large", "--sample-rate", "8000",
                       "--max-num-streams", "7", "--max-stream-seconds", "2.5",
                       "--precision", "int8")
        self.assertEqual((o["port"], o["ws-port"], o["status-port"], o["model-size"],
                          o["sample-rate"], o["max-num-streams"], o["max-batch"],
                          o["max-stream-seconds"], o["precision"]),
                         (1, 2, 3, "large", 8000, 7, 7, 2.5, "int8"))

    def test_bad_values(self):
        for argv in (["--port", "70000"], ["--port", "x"], ["--model-size", "medium"],
                     ["--sample-rate", "4000"], ["--max-num-streams", "0"],
                     ["--max-stream-seconds", "-1"], ["--precision", "int4"], ["--bogus"]):
            self.assertRaises(usage.UsageError, self.parse, *argv)

    def test_turn_flags(self):
        o = self.parse()
        self.assertEqual((o["vad-threshold"], o["vad-min-silence-ms"], o["eou-silence-ms"],
                          o["finalize-silence-ms"], o["no-vad"]), (0.5, 300, 800, 0, 0))
        o = self.parse("--vad-threshold", "0.7", "--vad-min-silence-ms", "100",
                       "--eou-silence-ms", "0", "--finalize-silence-ms", "1500", "--no-vad")
        self.assertEqual((o["vad-threshold"], o["vad-min-silence-ms"], o["eou-silence-ms"],
                          o["finalize-silence-ms"], o["no-vad"]), (0.7, 100, 0, 1500, 1))
        for argv in (["--vad-threshold", "1"], ["--vad-threshold", "0"],
                     ["--eou-silence-ms", "-5"], ["--finalize-silence-ms", "x"]):
            self.assertRaises(usage.UsageError, self.parse, *argv)

    def test_model_sizes(self):
        self.assertEqual(MODEL_SIZES, {
            "small": "nvidia/parakeet_realtime_eou_120m-v1",
            "large": "nvidia/nemotron-speech-streaming-en-0.6b",
            "multilingual": "nvidia/nemotron-3.5-asr-streaming-0.6b"})

    def test_command_line_has_serve(self):
        options = cli.Options()
        options.parseOptions(["serve", "--port", "9"])
        self.assertEqual(options.subCommand, "serve")
        self.assertEqual(options.subOptions["port"], 9)
        self.assertRaises(usage.UsageError, cli.Options().parseOptions, [])

    def test_options_after_arguments(self):
        # As GNU tools take them: "transcribe FILE --url URL".
        options = cli.Options()
        options.parseOptions(["transcribe", "a.wav", "--url", "tcp://h:1", "b.wav", "-p",
                              "--speed=2", "--", "--not-an-option.wav"])
        sub = options.subOptions
        self.assertEqual((sub["files"], sub["url"], sub["partials"], sub["pace"]),
                         (["a.wav", "b.wav", "--not-an-option.wav"], "tcp://h:1", 1, 2.0))
        # Options of the command are not taken before it.
        self.assertRaises(usage.UsageError, cli.Options().parseOptions,
                          ["--url", "tcp://h:1", "transcribe"])

    def test_version_and_usage_lines(self):
        from parakeet import __version__

        for argv in (["--version"], ["serve", "--version"], ["transcribe", "--version"],
                     ["bench", "--version"], ["demo", "--version"]):
            out = io.StringIO()
            self.patch(sys, "stdout", out)
            self.assertRaises(SystemExit, cli.Options().parseOptions, argv)
            self.assertEqual(out.getvalue(), "parakeet-server %s\n" % (__version__,), argv)
        for command, synopsis in (("serve", "serve [options]"),
                                  ("transcribe", "transcribe [options] [FILE...]"),
                                  ("demo", "demo [options]")):
            options = cli.Options()
            with self.assertRaises(usage.UsageError):
                options.parseOptions([command, "--no-such-flag"])
            self.assertTrue(str(options).startswith("Usage: parakeet-server %s\n"
                                                    % (synopsis,)), str(options)[:80])

    def test_plugin(self):
        plugins = {p.tapname: p for p in getPlugins(IServiceMaker)}
        self.assertIn("parakeet", plugins)
        plugin = plugins["parakeet"]
        self.assertIs(plugin.options, tap.Options)
        self.assertIs(plugin.makeService, tap.makeService)


class LoadingThreadTests(unittest.TestCase):
    """The model is loaded on a thread of its own that has ended by the time
    the server runs, so that its torch worker threads end with it."""

    @defer.inlineCallbacks
    def test_result_and_thread(self):
        import threading

        seen = []

        def load(a, b=0):
            seen.append(threading.current_thread())
            return a + b

        self.assertEqual((yield tap.in_own_thread(reactor, load, 2, b=3)), 5)
        self.assertIsNot(seen[0], threading.main_thread())
        seen[0].join(5)
        self.assertFalse(seen[0].is_alive())

    @defer.inlineCallbacks
    def test_errors_reach_the_caller(self):
        def load():
            raise ModelUnavailable("no such model")

        with self.assertRaises(ModelUnavailable) as e:
            yield tap.in_own_thread(reactor, load)
        self.assertEqual(str(e.exception), "no such model")


class ServiceTests(unittest.TestCase):

    def test_service_tree(self):
        options = tap.Options()
        options.parseOptions(["--port", "0", "--ws-port", "0", "--host", "127.0.0.1"])
        top = tap.makeService(options, reactor, engine=shared_tiny_engine())
        self.assertEqual(sorted(s.name for s in top),
                         ["TCP clients", "WebSocket clients", "decoder"])
        options.parseOptions(["--port", "0", "--ws-port", "0", "--status-port", "0"])
        top = tap.makeService(options, reactor, engine=shared_tiny_engine())
        self.assertEqual(sorted(s.name for s in top),
                         ["TCP clients", "WebSocket clients", "decoder", "status checks"])

    def test_no_vad_loads_no_detector(self):
        from parakeet.engine import vad

        def refuse(*args, **kwargs):
            raise AssertionError("the voice activity detector was loaded")

        self.patch(vad, "VoiceActivity", refuse)
        options = tap.Options()
        options.parseOptions(["--model", tiny_model_path(), "--device", "cpu",
                              "--max-num-streams", "2", "--no-vad"])
        self.assertIsNone(tap.load_engine(options).vad)
        options = tap.Options()
        options.parseOptions(["--model", tiny_model_path(), "--device", "cpu",
                              "--max-num-streams", "2"])
        self.assertRaises(AssertionError, tap.load_engine, options)

    def test_reachable_before_nemo_is_imported(self):
        # An id neither cached nor downloadable fails at once, naming the
        # ways out; a path, or an id with a cached snapshot, goes on to NeMo.
        from huggingface_hub import constants

        cache = os.path.abspath(self.mktemp())
        self.patch(constants, "HF_HUB_CACHE", cache)
        self.patch(constants, "HF_HUB_OFFLINE", True)
        with self.assertRaises(ModelUnavailable) as caught:
            check_reachable("nvidia/not-cached")
        for part in ("cannot load model nvidia/not-cached", cache, "--model demo"):
            self.assertIn(part, str(caught.exception))
        os.makedirs(os.path.join(cache, "models--nvidia--cached", "snapshots", "abc"))
        check_reachable("nvidia/cached")
        check_reachable("/nonexistent/model.nemo")


class CommandTests(unittest.TestCase):
    """The real programs, in child processes."""

    @defer.inlineCallbacks
    def test_help_lists_every_flag(self):
        for argv in ([os.path.join(BIN, "parakeet-server"), "--help"],
                     [os.path.join(BIN, "parakeet-server"), "serve", "--help"],
                     [os.path.join(BIN, "twistd"), "parakeet", "--help"]):
            proc, _ = spawn(self, argv)
            code = yield proc.ended
            self.assertEqual(code, 0, proc.err)
            for flag in FLAGS:
                self.assertIn(flag.encode() + b"=", proc.out, (argv, flag))
            if argv[1:] == ["--help"]:
                # The commands, one line each, come before serve's flags.
                commands = proc.out.index(b"Commands:")
                self.assertLess(commands, proc.out.index(b"--model="))
                for name in (b"serve", b"demo", b"transcribe", b"bench"):
                    self.assertIn(b"\n    " + name + b" ", proc.out[commands:])

    @defer.inlineCallbacks
    def test_demo(self):
        # From nothing to a transcript: the demo command loads the built-in
        # model, streams the bundled sample, prints both texts and keeps
        # serving (the page, a stream of ours) until Ctrl-C.
        from parakeet.clients.connection import connect
        from parakeet.checkpoints import DEMO_SAMPLE_TEXT

        from .support.models import WER_BOUND

        ports = free_ports(3)
        proc, transport = spawn(self, [os.path.join(BIN, "parakeet-server"), "demo",
                                       "--port", str(ports[0]), "--ws-port", str(ports[1]),
                                       "--http-port", str(ports[2])])
        yield proc.wait_for_output(b"Ctrl-C stops it.\n")
        lines = proc.out.decode().splitlines()
        said = [line.split(":", 1)[1].strip() for line in lines if line.startswith("  said:")]
        heard = [line.split(":", 1)[1].strip() for line in lines if line.startswith("  heard:")]
        self.assertEqual(said, [DEMO_SAMPLE_TEXT])
        self.assertLessEqual(corpus.word_error_rate([(said[0], heard[0])]), WER_BOUND, lines)
        self.assertIn("http://127.0.0.1:%d/" % (ports[2],), proc.out.decode())
        self.assertIn("OpenAI and Deepgram: http://127.0.0.1:%d/v1 " % (ports[2],),
                      proc.out.decode())
        client = yield connect(reactor, "tcp://127.0.0.1:%d" % (ports[0],))
        self.assertEqual((yield client.next())["type"], "hello")
        client.send_audio(speechlike(5, 0.5), final=True)
        yield client.final()
        transport.signalProcess("INT")
        self.assertEqual((yield proc.ended), 0, proc.err)
        self.assertNotIn(b"Traceback", proc.err)

    @defer.inlineCallbacks
    def test_model_that_cannot_be_had(self):
        # No checkpoint in the cache and no way to download it: one line that
        # names the model and the ways out, and a non-zero exit.
        proc, _ = spawn(self, [os.path.join(BIN, "parakeet-server"), "serve",
                               "--model-size", "large", "--device", "cpu"])
        code = yield proc.ended
        self.assertEqual(code, 1)
        lines = proc.err.decode().strip().splitlines()
        self.assertEqual(len(lines), 1, proc.err)
        for part in ("parakeet-server: cannot load model "
                     "nvidia/nemotron-speech-streaming-en-0.6b", "--model", "HF_HOME",
                     "--model demo"):
            self.assertIn(part, lines[0])

    @defer.inlineCallbacks
    def serve_and_transcribe(self, argv, exit_status=0):
        """Start argv, stream over TCP and WebSocket, stop it with SIGTERM."""
        from parakeet.clients import connection

        from .support.models import offline_tokens, quantized

        started = reactor.seconds()
        proc, transport = spawn(self, argv)
        ports = {}
        for what in ("TCP clients", "WebSocket clients", "status checks"):
            match = yield proc.wait_for_output(
                b"listening for " + what.encode() + rb" on 127\.0\.0\.1:(\d+)")
            ports[what] = int(match.group(1))
        yield proc.wait_for_output(rb"ready: serving ")
        startup = reactor.seconds() - started
        audio = speechlike(50, 1.5)
        expected, _ = offline_tokens(shared_tiny_engine(), quantized(audio))
        for address in ("tcp://127.0.0.1:%d" % ports["TCP clients"],
                        "ws://127.0.0.1:%d" % ports["WebSocket clients"]):
            client = yield connection.connect(reactor, address)
            hello = yield client.next()
            self.assertEqual(hello["sample_rate"], 16000)
            client.send_audio(audio, final=True)
            final = yield client.final()
            yield client.closed
            self.assertEqual([t for r in client.results() for t in r["token_ids"]],
                             expected)
            self.assertTrue(final["is_final"])
        yield wait_for(lambda: b"stream 2 closed (final)" in proc.out)
        # Two streams are still open when the server is told to stop: they
        # are decoded to their end and get their final results.
        open_streams = []
        for address in ("tcp://127.0.0.1:%d" % ports["TCP clients"],
                        "ws://127.0.0.1:%d" % ports["WebSocket clients"]):
            client = yield connection.connect(reactor, address)
            yield client.next()
            client.send_audio(audio)
            yield client.next(lambda m: m["type"] == "result")
            open_streams.append(client)
        transport.signalProcess("TERM")
        for client in open_streams:
            final = yield client.final()
            yield client.closed
            self.assertEqual([t for r in client.results() for t in r["token_ids"]],
                             expected)
            self.assertEqual(final["audio_ms"], 1500.0)
            self.assertEqual(client.errors(),
                             ["the server is shutting down: the stream was finalized"])
        code = yield proc.ended
        self.assertEqual(code, exit_status, proc.out[-3000:] + proc.err)
        self.assertIn(b"Main loop terminated.", proc.out)
        return proc, startup

    @defer.inlineCallbacks
    def test_parakeet_server_serve(self):
        proc, startup = yield self.serve_and_transcribe(
            [os.path.join(BIN, "parakeet-server"), "serve", "--model", tiny_model_path(),
             "--host", "127.0.0.1", "--port", "0", "--ws-port", "0", "--status-port",
             "0", "--device", "cpu", "--max-num-streams", "4"])
        out = proc.out.decode()
        self.assertIn("parakeet-server 0.1.0 starting:", out)
        self.assertIn("--max-num-streams=4", out)
        self.assertIn("serving %s on cpu in float32: 160 ms chunks" % tiny_model_path(), out)
        self.assertRegex(out, r"stream 1 opened by 127\.0\.0\.1:\d+ over tcp")
        self.assertRegex(out, r"stream 1 closed \(final\) for 127\.0\.0\.1:\d+: "
                              r"1\.50 s of audio in \d+\.\d\d s")
        self.assertRegex(out, r"stream 2 opened by 127\.0\.0\.1:\d+ over websocket")
        self.assertRegex(out, r"stream 4 closed \(shutdown\)")
        drained = re.search(r"drained 2 streams in (\d+\.\d+) s", out)
        self.assertIsNotNone(drained, out)
        sys.stderr.write("[drained 2 open streams in %s s] " % (drained.group(1),))
        sys.stderr.write("[start-up of parakeet-server serve with the tiny model: %.1f s] "
                         % (startup,))

    @defer.inlineCallbacks
    def test_twistd_plugin(self):
        # As under supervisord: twistd in the foreground, no pid file, and no
        # --device, so the server says which device it picked.  After a clean
        # shutdown twistd ends itself with the signal that stopped it, as
        # supervisord expects of a program it stopped.
        proc, _ = yield self.serve_and_transcribe(
            [os.path.join(BIN, "twistd"), "-n", "--pidfile=", "parakeet", "--model",
             tiny_model_path(), "--host", "127.0.0.1", "--port", "0", "--ws-port", "0",
             "--status-port", "0"], exit_status="signal %d" % signal.SIGTERM)
        self.assertIn(b"CUDA is not available: running the model on the CPU", proc.out)
        self.assertIn(b"stream 2 closed (final)", proc.out)


class DocumentationTests(ServerTestMixin, unittest.TestCase):
    """What README.rst and conf/ say works."""

    transport = "tcp"

    def test_supervisord_program(self):
        import configparser
        import shlex

        parser = configparser.ConfigParser()
        parser.read(os.path.join(ROOT, "conf", "parakeet.conf"))
        program = parser["program:parakeet"]
        argv = shlex.split(program["command"])
        self.assertEqual([os.path.basename(argv[0])] + argv[1:4],
                         ["twistd", "-n", "--pidfile=", "parakeet"])
        options = tap.Options()
        options.parseOptions(argv[4:])  # the server's own flags, all valid
        self.assertEqual(program["stopsignal"], "TERM")
        # supervisord waits for the drain before it kills.
        self.assertGreater(int(program["stopwaitsecs"]), options["drain-seconds"])

    @defer.inlineCallbacks
    def test_readme_client(self):
        import wave

        from twisted.internet import utils

        from .support.models import offline_tokens, quantized

        with open(os.path.join(ROOT, "README.rst")) as f:
            readme = f.read()
        section = readme.split("A client in Python\n")[1].split("Run it as")[0]
        code = "\n".join(line[4:] for line in section.split("::\n", 1)[1].splitlines())
        with open("client.py", "w") as f:
            f.write(code)
        audio = quantized(speechlike(60, 1.2))
        with wave.open("speech.wav", "wb") as wav:
            wav.setnchannels(1)
            wav.setsampwidth(2)
            wav.setframerate(16000)
            wav.writeframes((audio * 32768).astype("<i2").tobytes())
        self.start_server()
        out, err, code = yield utils.getProcessOutputAndValue(
            sys.executable, ["client.py", "127.0.0.1", str(self.ports["TCP clients"]),
                             "speech.wav"], env=os.environ, path=os.getcwd())
        self.assertEqual(code, 0, err)
        lines = out.decode().splitlines()
        expected, _ = offline_tokens(self.engine, audio)
        text = self.tokenizer().ids_to_text(expected)
        self.assertEqual(lines[-1].split(), ["final:"] + text.split())
        self.assertTrue(all(line.startswith("partial: ") for line in lines[:-1]))
