"""
A load generator for a running server: ``parakeet-server bench``.

    parakeet-server bench --url ws://127.0.0.1:8000 --streams 8 --seconds 30

opens N concurrent streams, sends each of them real audio paced in real time
(``--chunk-ms`` of audio per message, on an absolute schedule), and reports
how late the server's results come back, how many streams kept up, and, with
``--server-pid``, the server's CPU and memory.  ``--find-max`` searches for
the most streams the server keeps up with; ``--ceiling-model`` runs the
same model in-process (:mod:`parakeet.measuring.ceiling`) for comparison: in
lockstep, and paced as the server decodes, with no sockets and no reactor.

Latency is measured with the ``audio_ms`` every result carries: the audio,
from the stream's first sample, that the server needed for the result.  A
result's latency is its arrival time minus the send time of the audio message
that first brought the stream to ``audio_ms``.

This module is the command: its options and the course of a bench.  The
load is :mod:`parakeet.clients.loadgen`, the server's CPU and memory
:mod:`parakeet.clients.serverstats`, and the report
:mod:`parakeet.clients.report`.
"""

import datetime
import json
import os
import shlex
import sys

from twisted.internet import defer, task
from twisted.python import usage

from ..options import CommandOptions, not_negative, positive
from .audiofiles import read_audio_file, synthesized_audio
from .loadgen import Run, Target, Workload, find_max
from .report import (
    DEFINITIONS, TABLE_HEADER, ceiling_lines, framing_words, run_details, summary_line,
    table_row)
from .serverstats import IDLE_WINDOW, process_cpu_seconds, wait_until_idle


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
        % (target.url, framing_words(framing),
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

    from ..measuring.ceiling import Ceiling

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
