"""
``parakeet-server bench``: its options, and whole runs against the server on
loopback, over WebSocket and TCP, in-process and as a child process.  (Its
pieces are tested in test_loadgen, test_serverstats and test_audiofiles.)
"""

import io
import json
import math
import os
import re

import numpy as np
from twisted.internet import defer, reactor
from twisted.python import usage
from twisted.trial import unittest

from parakeet import cli
from parakeet.clients import audiofiles, bench
from parakeet.measuring import ceiling as ceiling_module

from .support.models import speechlike, tiny_model_path, write_wav
from .support.servers import BIN, ServerTestMixin, spawn

SUMMARY = re.compile(
    r"^bench: N=(\d+) (ws|ws-binary|tcp) kept-up (\d+)/(\d+) p50 \S+ ms p95 \S+ ms "
    r"p99 \S+ ms ttf p50 \S+ ms errors (\d+)", re.M)


def parse(*argv):
    options = bench.Options()
    options.parseOptions(list(argv))
    return options


class OptionsTests(unittest.TestCase):

    def test_defaults(self):
        options = parse()
        self.assertEqual((options["streams"], options["seconds"], options["chunk-ms"],
                          options["stagger"], options["keep-up-ms"], options["p95-ms"]),
                         (1, 30.0, 100, 5.0, 1000.0, 320.0))
        self.assertEqual(options.framing, "ws")
        self.assertTrue(options["target"].loopback)
        self.assertEqual(parse("--seconds", "8")["stagger"], 2.0)
        # The ceiling's streams are as long as the load's unless told.
        self.assertEqual(parse("--seconds", "8")["ceiling-seconds"], 8.0)
        self.assertEqual(parse("--seconds", "8", "--ceiling-seconds", "3")["ceiling-seconds"],
                         3.0)

    def test_targets(self):
        options = parse("--url", "tcp://example.com:8765", "--stagger", "0")
        self.assertEqual((options.framing, options["target"].host, options["target"].port,
                          options["target"].loopback, options["stagger"]),
                         ("tcp", "example.com", 8765, False, 0.0))
        self.assertEqual(parse("--url", "ws://[::1]:9/x", "--binary").framing, "ws-binary")

    def test_bad_options(self):
        for argv in (["--url", "http://localhost:8000"], ["--url", "tcp://localhost"],
                     ["--url", "tcp://localhost:1", "--binary"],
                     ["--url", "ws://localhost:1/?encoding=f32", "--binary"],
                     ["--streams", "0"], ["--audio", "/no/such.wav"],
                     ["--server-pid", "999999999"]):
            self.assertRaises(usage.UsageError, parse, *argv)

    def test_command_line_has_bench(self):
        options = cli.Options()
        options.parseOptions(["bench", "--url", "tcp://127.0.0.1:1", "-n", "3"])
        self.assertEqual(options.subCommand, "bench")
        self.assertEqual(options.subOptions["streams"], 3)


class NoServerTests(unittest.TestCase):

    @defer.inlineCallbacks
    def test_nothing_listening(self):
        import socket

        with socket.socket() as sock:  # a port that nothing listens on
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        options = parse("--url", "tcp://127.0.0.1:%d" % port, "--streams", "2",
                        "--seconds", "1", "--stagger", "0")
        report = yield bench.bench(reactor, options, out=io.StringIO())
        run = report["runs"][0]
        self.assertEqual((run["opened"], run["kept_up"], run["errors"]["count"]), (0, 0, 2))
        self.assertIn("cannot connect", run["errors"]["first"][0])
        self.assertEqual(run["latency_ms"]["p50"], None)
        self.assertIn("kept-up 0/2 p50 - ms", report["summary"])
        self.assertEqual(bench.exit_code(report), 1)


class BenchAgainstServerTests(ServerTestMixin, unittest.TestCase):
    """The bench against the server on loopback with the tiny model."""

    timeout = 120

    def assertRunConsistent(self, run, n, seconds, chunk_ms=100):
        self.assertEqual(run["streams"], n)
        self.assertEqual(run["opened"], n)
        self.assertEqual(run["finished"], n)
        self.assertEqual(run["errors"], {"count": 0, "first": []})
        self.assertEqual(run["unmatched_results"], 0)
        streams = run["per_stream"]
        self.assertEqual(len(streams), n)
        self.assertEqual(len({s["stream_id"] for s in streams}), n)
        self.assertEqual(run["kept_up"], sum(s["kept_up"] for s in streams))
        self.assertLessEqual(run["kept_up"], run["opened"])
        self.assertEqual(run["results"], sum(s["results"] for s in streams))
        for s in streams:
            self.assertEqual(s["ticks_sent"], math.ceil(seconds * 1000 / chunk_ms))
            self.assertAlmostEqual(s["audio_seconds_sent"], seconds)
            self.assertGreaterEqual(s["time_to_final_ms"], 0)
            self.assertGreaterEqual(s["hello_ms"], 0)
            self.assertEqual(s["errors"], [])
        latency = run["latency_ms"]
        self.assertGreaterEqual(latency["count"], n)  # at least each final result
        self.assertEqual(latency["count"], run["results"])
        values = [latency[k] for k in ("p50", "p95", "p99", "max")]
        for value in values:
            self.assertIsInstance(value, float)
            self.assertGreaterEqual(value, 0.0)
        self.assertEqual(values, sorted(values))
        ttf = run["time_to_final_ms"]
        self.assertEqual(ttf["count"], n)
        self.assertGreaterEqual(ttf["p50"], 0.0)
        self.assertLessEqual(ttf["p50"], ttf["p95"])
        self.assertGreaterEqual(run["bench"]["lateness_ms"]["count"], n)
        self.assertIsInstance(run["bench"]["behind"], bool)
        self.assertIn(run["passed"], (True, False))

    def assertServerMeasured(self, server):
        self.assertEqual(server["pid"], os.getpid())
        self.assertGreaterEqual(server["cpu_percent"], 0)
        for key in ("rss_before_bytes", "rss_peak_bytes", "rss_end_bytes"):
            self.assertGreater(server[key], 1 << 20)
        self.assertIsInstance(server["rss_per_stream_bytes"], int)

    @defer.inlineCallbacks
    def run_bench(self, *argv):
        out = io.StringIO()
        options = parse(*argv)
        report = yield bench.bench(reactor, options, out=out,
                                   command=["parakeet-server", "bench"] + list(argv))
        return report, out.getvalue()

    @defer.inlineCallbacks
    def test_websocket(self):
        self.start_server()
        audio = write_wav(os.path.abspath("bench-22k.wav"), speechlike(5, 1.3), 22050)
        out_json = os.path.abspath("bench-ws.json")
        argv = ["--url", "ws://127.0.0.1:%d" % self.ports["WebSocket clients"],
                "--streams", "2", "--seconds", "3", "--audio", audio,
                "--server-pid", str(os.getpid()), "--json", out_json]
        report, text = yield self.run_bench(*argv)
        self.assertEqual(len(report["runs"]), 1)
        run = report["runs"][0]
        self.assertRunConsistent(run, 2, 3.0)
        self.assertEqual(run["framing"], "ws")
        self.assertServerMeasured(run["server"])
        self.assertEqual(report["argv"], ["parakeet-server", "bench"] + argv)
        self.assertIn("22050 Hz", report["audio"]["description"])
        with open(out_json) as f:
            self.assertEqual(json.load(f), json.loads(json.dumps(report)))
        summary = SUMMARY.findall(text)
        self.assertEqual(len(summary), 1)
        self.assertEqual(summary[0][:2], ("2", "ws"))
        self.assertEqual(summary[0][3:], ("2", "0"))
        self.assertEqual(text.strip().splitlines()[-1], report["summary"])
        self.assertIn("server-cpu", report["summary"])
        self.assertIn("NOTE: the server is on loopback", text)
        self.assertIn("kept up:", text)

    @defer.inlineCallbacks
    def test_binary_websocket(self):
        self.start_server()
        report, text = yield self.run_bench(
            "--url", "ws://127.0.0.1:%d" % self.ports["WebSocket clients"],
            "--streams", "2", "--seconds", "1.6", "--binary", "--chunk-ms", "80")
        run = report["runs"][0]
        self.assertRunConsistent(run, 2, 1.6, chunk_ms=80)
        self.assertEqual(run["framing"], "ws-binary")
        self.assertIsNone(run["server"])
        self.assertIn("bench: N=2 ws-binary kept-up", report["summary"])

    @defer.inlineCallbacks
    def test_tcp_child_process(self):
        self.start_server()
        out_json = os.path.abspath("bench-tcp.json")
        argv = [os.path.join(BIN, "parakeet-server"), "bench",
                "--url", "tcp://127.0.0.1:%d" % self.ports["TCP clients"],
                "--streams", "2", "--seconds", "3", "--json", out_json]
        proc, _ = spawn(self, argv)
        code = yield proc.ended
        self.assertEqual(code, 0, proc.err.decode())
        with open(out_json) as f:
            report = json.load(f)
        run = report["runs"][0]
        self.assertRunConsistent(run, 2, 3.0)
        self.assertEqual(run["framing"], "tcp")
        self.assertEqual(report["argv"], ["parakeet-server"] + argv[1:])
        self.assertTrue(report["command"].startswith("parakeet-server bench --url tcp://"))
        text = proc.out.decode()
        self.assertEqual(SUMMARY.findall(text)[0][:2], ("2", "tcp"))
        self.assertEqual(text.strip().splitlines()[-1], report["summary"])

    @defer.inlineCallbacks
    def test_refused_streams_are_errors(self):
        self.start_server("--max-num-streams", "1")
        report, text = yield self.run_bench(
            "--url", "ws://127.0.0.1:%d" % self.ports["WebSocket clients"],
            "--streams", "2", "--seconds", "1", "--stagger", "0")
        run = report["runs"][0]
        self.assertEqual((run["opened"], run["finished"], run["errors"]["count"]), (1, 1, 1))
        self.assertIn("No free streaming state available.", run["errors"]["first"][0])
        self.assertLessEqual(run["kept_up"], 1)
        self.assertEqual((run["passed"], run["verdict"]), (False, "errors"))
        self.assertIn("errors: 1, first: stream ", text)

    @defer.inlineCallbacks
    def test_find_max_with_ceiling(self):
        self.start_server()
        # The ceiling drives the server's own (idle) engine rather than load a
        # second copy of the model.
        loaded = []

        def load_engine(path, device, capacity, precision):
            self.assertEqual((path, device, precision), (tiny_model_path(), "cpu", "float32"))
            loaded.append(capacity)
            return self.engine

        self.patch(ceiling_module, "load_engine", load_engine)
        staggers, audios, measure_paced = [], [], ceiling_module.measure_paced

        def paced(*args, **kwargs):
            staggers.append(kwargs["stagger"])
            audios.append(kwargs["audio"])
            return measure_paced(*args, **kwargs)

        self.patch(ceiling_module, "measure_paced", paced)
        report, text = yield self.run_bench(
            "--url", "ws://127.0.0.1:%d" % self.ports["WebSocket clients"],
            "--find-max", "--max-streams", "2", "--seconds", "1.5", "--pause", "0",
            "--stagger", "0.25",
            "--p95-ms", "100000", "--keep-up-ms", "100000",
            "--ceiling-model", tiny_model_path(), "--ceiling-seconds", "2",
            "--ceiling-precision", "float32")
        probes = [(p["streams"], p["passed"]) for p in report["find_max"]["probes"]]
        self.assertEqual([r["streams"] for r in report["runs"]], [n for n, _ in probes])
        self.assertEqual([r["passed"] for r in report["runs"]], [p for _, p in probes])
        for run in report["runs"]:
            self.assertRunConsistent(run, run["streams"], 1.5)
        self.assertEqual(report["find_max"]["max_streams"],
                         max([n for n, p in probes if p], default=0))
        ceiling = report["ceiling"]
        self.assertEqual([p["streams"] for p in ceiling["probes"]][:1], [1])
        for p in ceiling["probes"]:
            self.assertGreater(p["steps"], 0)
            self.assertLessEqual(p["step_p50_ms"], p["step_p95_ms"])
            self.assertEqual(p["chunk_ms"], 160.0)
            paced = p["paced"]
            self.assertLessEqual(paced["latency_p50_ms"], paced["latency_p95_ms"])
            self.assertLessEqual(paced["latency_p95_ms"], paced["latency_max_ms"])
            self.assertGreater(paced["ttf_p50_ms"], 0)
            # With bounds no run can miss, every probe passes.
            self.assertTrue(p["passed"])
        self.assertEqual(ceiling["max_streams"], 2)
        # Its paced streams start as the load's do, and decode its audio.
        self.assertEqual(set(staggers), {0.25})
        sent = audiofiles.synthesized_audio().at_rate(16000)
        for audio in audios:
            np.testing.assert_array_equal(audio, sent)
        self.assertIn(ceiling["lockstep_max_streams"], (0, 1, 2))
        self.assertEqual(report["find_max"]["ceiling_max_streams"], ceiling["max_streams"])
        self.assertTrue(report["summary"].startswith("bench: find-max ws max N="))
        self.assertIn("ceiling max N=", report["summary"])
        self.assertIn("ceiling N=1 lockstep: step p50", text)
        self.assertIn("ceiling N=2 paced: latency p50", text)
        self.assertEqual(loaded, [16])
