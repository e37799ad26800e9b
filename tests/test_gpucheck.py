"""
``tools/gpu-check``, the GPU check ready to run (:mod:`parakeet.measuring.gpucheck`),
run with ``--device cpu`` on its smallest settings: the tiny replica trained
for four look-aheads, every engine check, the server and the bench as child
processes at two chunk sizes, the summary table and ``gpu-check.json``.
"""

import io
import json
import os
import re
import subprocess
import sys

from twisted.trial import unittest

from parakeet.measuring import gpucheck

from .support.servers import ROOT, environment

SCRIPT = os.path.join(ROOT, "tools", "gpu-check")

#: The engine checks of the replica, by model and chunk size, as the table names them.
ENGINE_ROWS = (
    [("tiny-lookaheads@%d" % ms, check) for ms in (160, 80, 560, 1120)
     for check in ("streaming = offline", "batch invariance")]
    + [("tiny-lookaheads@160", check) for check in (
        "bfloat16 vs float32", "float16 vs float32", "cuda-graph decoder")])

#: What streams at 80 ms chunks decode differently from offline decoding.
AT_80_MS = ("tiny-lookaheads@80", "streaming = offline")

_run = {}


def run_once():
    """(exit status, output, JSON report, out folder) of one run for the module."""
    if not _run:
        import torch

        threads = torch.get_num_threads()
        out_dir = os.path.abspath("gpu-check-out")
        out = io.StringIO()
        try:
            code = gpucheck.main([
                "--device", "cpu", "--arch", "tiny-lookaheads", "--out", out_dir,
                "--cache-dir", os.path.abspath("gpu-check-cache"), "--streams", "2",
                "--audio-seconds", "1.5", "--seconds", "1", "--max-streams", "1"], out)
        finally:
            torch.set_num_threads(threads)
        with open(os.path.join(out_dir, "gpu-check.json")) as f:
            _run.update(code=code, text=out.getvalue(), report=json.load(f), out_dir=out_dir)
    return _run


class CommandTests(unittest.TestCase):

    def test_script(self):
        with open(SCRIPT) as f:
            self.assertEqual(f.readline(), "#!/usr/bin/env python3\n")
        self.assertTrue(os.access(SCRIPT, os.X_OK))
        done = subprocess.run([sys.executable, SCRIPT, "--help"], capture_output=True,
                              env=environment(), cwd="/", timeout=60)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertIn(b"Usage: tools/gpu-check", done.stdout)
        self.assertIn(b"--device", done.stdout)

    def test_defaults_by_device(self):
        options = gpucheck.Options()
        options.parseOptions(["--device", "cpu"])
        self.assertEqual((options["arch"], options["max-streams"], options["threads"]),
                         (["tiny", "tiny-lookaheads"], 4, 1))
        self.assertEqual(gpucheck.throughput_configs(["small", "large"]),
                         [("small", 160), ("large", 160), ("large", 560)])
        self.assertEqual(gpucheck.trained_chunks_ms("large"), [160, 80, 560, 1120])


class PartialBenchTests(unittest.TestCase):
    """A bench stopped at its time limit: what its output says so far."""

    def test_probes_so_far(self):
        text = "\n".join([
            "ceiling N=32 paced: latency p50 40 ms, p95 61 ms, max 90 ms; ttf p50 41 ms: pass",
            "ceiling N=64 paced: latency p50 80 ms, p95 410 ms, max 990 ms; ttf p50 41 ms: fail",
            "     N opened kept-up results  p50 ms  p95 ms  p99 ms  max ms ttf p50 ttf p95 "
            "errors late max srv cpu    srv rss  verdict",
            "    32     32   32/32     964      18      43      49      55      19      19"
            "      0        5     48%  842.4 MiB  pass",
            "    64     64   61/64    1901      22     433     526     549      19      19"
            "      0        5     90%  1.02 GiB  3 did not keep up",
            "    48     48   48/48    1400      20      60      66      70      19      19"
            "      0        5     70%          -  pass"])
        self.assertEqual(gpucheck.from_output(text), {
            "sustained": 48, "fails_at": 64, "p50_ms": 20.0, "p95_ms": 60.0, "ceiling": 32,
            "complete": False})
        self.assertEqual(gpucheck.from_output("")["sustained"], 0)

    def test_failed_stage_is_a_row(self):
        results = gpucheck.Results(self.mktemp(), {}, io.StringIO())
        os.makedirs(results.out_dir)
        self.assertIsNone(results.stage("m", "c", lambda: 1 / 0))
        [found] = results.rows
        self.assertEqual((found["model"], found["check"], found["result"], found["detail"]),
                         ("m", "c", "error", "ZeroDivisionError: division by zero"))
        self.assertFalse(results.passed)


class CPURunTests(unittest.TestCase):
    """One run of ``--device cpu`` on the smallest settings."""

    timeout = 300

    def rows(self):
        return {(r["model"], r["check"]): r for r in run_once()["report"]["rows"]}

    def test_engine_checks(self):
        rows = self.rows()
        for key in ENGINE_ROWS:
            self.assertIn(key, rows)
            if key != AT_80_MS:
                self.assertIn(rows[key]["result"], ("pass", "info", "skipped"), rows[key])
        for key in ENGINE_ROWS[:8]:
            self.assertEqual(rows[key]["streams"], 2)
            self.assertGreater(rows[key]["tokens"], 0)
        bf16 = rows["tiny-lookaheads@160", "bfloat16 vs float32"]
        self.assertTrue(0 <= bf16["agreement"] <= 1)
        for check in ("float16 vs float32", "cuda-graph decoder"):
            self.assertEqual(rows["tiny-lookaheads@160", check]["detail"], "CUDA only")

    def test_streaming_at_80_ms(self):
        self.assertEqual(self.rows()[AT_80_MS]["result"], "pass")

    test_streaming_at_80_ms.todo = (
        "at 80 ms chunks (look-ahead 0) streaming decodes other tokens than offline "
        "decoding from the second chunk on")

    def test_throughput(self):
        rows = self.rows()
        for model in ("tiny-lookaheads@160", "tiny-lookaheads@560"):
            row = rows[model, "throughput"]
            self.assertEqual(row["result"], "pass", row)
            self.assertEqual((row["sustained"], row["complete"]), (1, True))
            self.assertIsInstance(row["p95_ms"], float)
            self.assertIn(row["ceiling"], (0, 1))
            self.assertIn("N=1 sustained", row["detail"])

    def test_table_json_and_files(self):
        run = run_once()
        report = run["report"]
        self.assertTrue(report["finished"])
        self.assertEqual(report["machine"]["device"], "cpu")
        self.assertEqual(run["code"], 0 if report["passed"] else 1)
        self.assertEqual(report["passed"], all(r["result"] in ("pass", "info", "skipped")
                                               for r in report["rows"]))
        # The table: a header, then a line per row, in the JSON's order.
        lines = run["text"].splitlines()
        header = lines.index(next(line for line in lines if line.startswith("model ")))
        table = lines[header + 1:header + 1 + len(report["rows"])]
        column = lines[header].index("result")
        for line, row in zip(table, report["rows"]):
            self.assertEqual(line.split()[0], row["model"])
            self.assertTrue(line[column:].startswith(row["result"] + " "), line)
            self.assertTrue(line.endswith(row["detail"]))
        self.assertIn(run["out_dir"], lines[0])
        names = sorted(os.listdir(run["out_dir"]))
        for name in names:
            self.assertRegex(name, r"^[A-Za-z0-9._-]+$")
            self.assertTrue(os.path.isfile(os.path.join(run["out_dir"], name)))
        for model in ("tiny-lookaheads-160", "tiny-lookaheads-560"):
            for suffix in ("-server.log", "-bench.json", "-bench.log"):
                self.assertIn(model + suffix, names)
            with open(os.path.join(run["out_dir"], model + "-server.log")) as f:
                self.assertTrue(re.search(r"ready: serving .* on cpu", f.read()))
