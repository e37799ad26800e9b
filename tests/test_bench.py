"""
``parakeet-server bench``: its pure pieces (percentiles, latency matching,
the find-max search, the encoded messages), and whole runs against the server
on loopback, over WebSocket and TCP, in-process and as a child process.
"""

import io
import json
import math
import os
import re
import wave

import numpy as np
from twisted.internet import defer, reactor, task
from twisted.python import usage
from twisted.trial import unittest

from parakeet import cli
from parakeet.clients import bench
from parakeet.measuring import ceiling as ceiling_module

from .support.models import speechlike, tiny_model_path
from .support.servers import BIN, ServerTestMixin, spawn

SUMMARY = re.compile(
    r"^bench: N=(\d+) (ws|ws-binary|tcp) kept-up (\d+)/(\d+) p50 \S+ ms p95 \S+ ms "
    r"p99 \S+ ms ttf p50 \S+ ms errors (\d+)", re.M)


def parse(*argv):
    options = bench.Options()
    options.parseOptions(list(argv))
    return options


def write_wav(path, samples, rate, channels=1):
    pcm = (np.clip(samples, -1, 32767 / 32768) * 32768).astype("<i2")
    with wave.open(path, "wb") as wav:
        wav.setnchannels(channels)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes(np.repeat(pcm, channels).tobytes())
    return path


class PercentileTests(unittest.TestCase):

    def test_matches_numpy(self):
        values = [5.0, 1.0, 9.0, 3.0, 7.0, 2.0, 8.0]
        for q in (0, 10, 50, 95, 99, 100):
            self.assertAlmostEqual(bench.percentile(values, q), np.percentile(values, q))

    def test_edges(self):
        self.assertIsNone(bench.percentile([], 50))
        self.assertEqual(bench.percentile([4.0], 99), 4.0)
        self.assertEqual(bench.percentile([1.0, 2.0], 50), 1.5)


class LatencyMatchingTests(unittest.TestCase):
    # Three 100 ms messages sent at 10.0, 10.1 and 10.25 (the last one late).
    cumulative = [100.0, 200.0, 300.0]
    sent = [10.0, 10.1, 10.25]

    def latencies(self, *results, sent=None):
        return bench.result_latencies(results, self.cumulative,
                                      self.sent if sent is None else sent)

    def test_first_message_reaching_audio_ms(self):
        found = self.latencies((10.05, 40.0), (10.3, 150.0), (10.4, 300.0))
        for got, want in zip(found, [0.05, 0.2, 0.15]):
            self.assertAlmostEqual(got, want)

    def test_boundaries(self):
        # Exactly a message's cumulative audio is that message, not the next;
        # a rounded audio_ms a hair above it too.
        found = self.latencies((10.2, 200.0), (10.2, 200.0004), (10.2, 0.0))
        for got, want in zip(found, [0.1, 0.1, 0.2]):
            self.assertAlmostEqual(got, want)
        self.assertAlmostEqual(self.latencies((10.5, 200.7))[0], 0.25)

    def test_unmatched(self):
        # More audio than was sent so far, or no audio_ms at all: no latency.
        self.assertEqual(self.latencies((10.2, 250.0), sent=[10.0, 10.1]), [None])
        self.assertEqual(self.latencies((10.5, 400.0), (10.5, None),
                                        (10.5, float("nan"))), [None, None, None])


class FindMaxTests(unittest.TestCase):

    def search(self, threshold, start, limit, deferred=False):
        probed = []

        def probe(n):
            probed.append(n)
            passed = n <= threshold
            return defer.succeed(passed) if deferred else passed

        best, tried = self.successResultOf(bench.find_max(probe, start, limit))
        self.assertEqual([n for n, _ in tried], probed)
        self.assertEqual([p for _, p in tried], [n <= threshold for n in probed])
        return best, probed

    def test_doubles_then_bisects(self):
        self.assertEqual(self.search(13, 1, 1024),
                         (13, [1, 2, 4, 8, 16, 12, 14, 13]))

    def test_first_probe_fails(self):
        self.assertEqual(self.search(5, 32, 1024), (5, [32, 16, 8, 4, 6, 5]))

    def test_nothing_passes(self):
        self.assertEqual(self.search(0, 4, 1024), (0, [4, 2, 1]))

    def test_limit(self):
        self.assertEqual(self.search(100, 3, 20), (20, [3, 6, 12, 20]))
        self.assertEqual(self.search(100, 50, 20), (20, [20]))

    def test_asynchronous_probe(self):
        self.assertEqual(self.search(6, 2, 64, deferred=True), (6, [2, 4, 8, 6, 7]))

    def test_every_answer(self):
        for threshold in range(0, 40):
            for start in (1, 3, 8):
                best, probed = self.search(threshold, start, 33)
                self.assertEqual(best, min(threshold, 33))
                self.assertEqual(len(probed), len(set(probed)))


class PayloadTests(unittest.TestCase):

    def test_json_messages(self):
        audio = speechlike(1, 0.25)  # shorter than the stream: it is looped
        plan = bench.Payloads(audio, 16000, 1.05, 100, "ws")
        self.assertEqual(len(plan.steps), 11)
        self.assertAlmostEqual(plan.interval, 0.1)
        self.assertEqual(plan.cumulative_ms[:2], [100.0, 200.0])
        self.assertEqual(plan.cumulative_ms[-1], 1050.0)
        messages = [json.loads(frames[0][0]) for frames in plan.steps]
        self.assertEqual([m["final"] for m in messages], [False] * 10 + [True])
        self.assertTrue(all(len(frames) == 1 and not frames[0][1] for frames in plan.steps))
        import base64

        pcm = b"".join(base64.b64decode(m["data"]) for m in messages)
        self.assertEqual(len(pcm), 2 * 16800)
        looped = np.frombuffer(pcm, "<i2")
        self.assertTrue(np.array_equal(looped[:4000], looped[4000:8000]))

    def test_tcp_lines(self):
        plan = bench.Payloads(speechlike(2, 1.0), 8000, 0.5, 100, "tcp")
        self.assertEqual(len(plan.steps), 5)
        for frames in plan.steps:
            self.assertTrue(frames[0][0].endswith(b"}\n"))
            self.assertEqual(frames[0][0].count(b"\n"), 1)

    def test_binary_messages(self):
        plan = bench.Payloads(speechlike(3, 1.0), 16000, 0.35, 100, "ws-binary")
        self.assertEqual([len(f[0][0]) for f in plan.steps], [3200, 3200, 3200, 1600])
        self.assertTrue(all(f[0][1] for f in plan.steps))
        self.assertEqual(len(plan.steps[-1]), 2)
        final, binary = plan.steps[-1][1]
        self.assertFalse(binary)
        self.assertEqual(json.loads(final), {"type": "audio", "data": "",
                                             "encoding": "pcm16", "final": True})


class AudioSourceTests(unittest.TestCase):

    def test_wav_file_to_mono_and_resampled(self):
        path = write_wav(self.mktemp() + ".wav", speechlike(4, 1.0), 22050, channels=2)
        source = bench.read_audio_file(path)
        self.assertEqual((source.rate, len(source.samples)), (22050, 16000))
        self.assertIn("2 channels averaged", source.description)
        self.assertEqual(len(source.at_rate(16000)), round(16000 * 16000 / 22050))
        self.assertIs(source.at_rate(16000), source.at_rate(16000))

    def test_without_espeak(self):
        self.patch(bench.shutil, "which", lambda name: None)
        source = bench.synthesized_audio()
        self.assertEqual(source.rate, 16000)
        self.assertIn("calibration_audio", source.description)
        self.assertGreater(source.seconds, 1.0)

    def test_with_espeak(self):
        if not bench.shutil.which("espeak-ng"):
            raise unittest.SkipTest("espeak-ng is not installed")
        source = bench.synthesized_audio("Hello there.")
        self.assertIn("espeak-ng", source.description)
        self.assertGreater(np.abs(source.samples).max(), 0.05)


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


class ProcTests(unittest.TestCase):

    def test_own_process(self):
        self.assertGreater(bench.process_cpu_seconds(os.getpid()), 0)
        self.assertGreater(bench.process_rss_bytes(os.getpid()), 1 << 20)


    def test_waits_until_the_server_is_idle(self):
        clock = task.Clock()
        # A core busy for 1.2 s, then idle.
        cpu = lambda: min(clock.seconds(), 1.2)
        d = bench.wait_until_idle(clock, cpu, busy=0.2, window=0.5)
        clock.advance(0.5)
        clock.advance(0.5)
        self.assertNoResult(d)
        clock.advance(0.5)  # 0.2 s of CPU in this window: still busy
        self.assertNoResult(d)
        clock.advance(0.5)
        self.assertEqual(self.successResultOf(d), 2.0)

    def test_gives_up_waiting_after_the_limit(self):
        clock = task.Clock()
        d = bench.wait_until_idle(clock, clock.seconds, window=0.5, limit=3.0)
        clock.pump([0.5] * 5)
        self.assertNoResult(d)
        clock.advance(0.5)
        self.assertEqual(self.successResultOf(d), 3.0)


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

        self.patch(bench, "load_engine", load_engine)
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
        sent = bench.synthesized_audio().at_rate(16000)
        for audio in audios:
            np.testing.assert_array_equal(audio, sent)
        self.assertIn(ceiling["lockstep_max_streams"], (0, 1, 2))
        self.assertEqual(report["find_max"]["ceiling_max_streams"], ceiling["max_streams"])
        self.assertTrue(report["summary"].startswith("bench: find-max ws max N="))
        self.assertIn("ceiling max N=", report["summary"])
        self.assertIn("ceiling N=1 lockstep: step p50", text)
        self.assertIn("ceiling N=2 paced: latency p50", text)
        self.assertEqual(loaded, [16])
