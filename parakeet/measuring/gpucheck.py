"""
A GPU check ready to run: ``tools/gpu-check``.

On a CUDA machine it builds the ``small`` and ``large`` random-weight
replicas (:mod:`parakeet.measuring.replica`), then

* checks the engine on the device, for each replica and each chunk size it
  was trained for: streaming decodes the tokens offline decoding does, in
  float32; streams decoded together in one batch get the tokens each gets
  alone; bfloat16 and float16 against float32 (how many streams come out
  the same, and how many tokens agree: reported, not failed); and the
  CUDA-graph greedy decoder against the plain one, token for token;
* measures throughput: ``parakeet-server serve`` as a child process for
  ``small`` at 160 ms chunks and ``large`` at 160 and 560 ms, loaded by
  ``parakeet-server bench --find-max --ceiling-model``.

It prints a table of every check at the end and keeps the same rows in
``gpu-check.json`` in ``--out``, beside the bench reports and the server
logs; the JSON is rewritten after every row, so that a run stopped part-way
leaves what it found.  Exit status 0 when every check passed.  ``--device
cpu`` runs the same code on the CPU with tiny replicas, in a few minutes.
"""

import datetime
import gc
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback

import attr
from twisted.python import usage

from ..options import CommandOptions
from .replica import ARCHITECTURES

#: The repository (or installed package) root: what children import parakeet from.
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

#: Milliseconds of audio per encoder frame of every replica (10 ms hops, 8x subsampling).
FRAME_MS = 80

#: Architectures the check knows beside :data:`ARCHITECTURES`: a tiny
#: model trained for the large model's four look-aheads, the large
#: model's stand-in on the CPU.
STAND_INS = {
    "tiny-lookaheads": attr.evolve(ARCHITECTURES["tiny"],
                                   att_context_size=((70, 1), (70, 0), (70, 6), (70, 13))),
}

#: The chunk sizes whose throughput is measured, where a replica is trained for them.
THROUGHPUT_CHUNKS_MS = (160, 560)

#: Defaults by device kind.
DEFAULTS = {
    "cuda": {"arch": "small,large", "streams": 8, "audio-seconds": 4.0,
             "seconds": 5.0, "ceiling-seconds": 2.0, "first-streams": 32,
             "max-streams": 512, "pause": 1.0, "budget": 420.0, "threads": None},
    "cpu": {"arch": "tiny,tiny-lookaheads", "streams": 3, "audio-seconds": 2.0,
            "seconds": 2.0, "ceiling-seconds": 2.0, "first-streams": 1,
            "max-streams": 4, "pause": 0.0, "budget": 600.0, "threads": 1},
}

#: The least time a throughput measurement gets, whatever is left of --budget.
MIN_ALLOWANCE = 60.0

#: Results that are not failures.
PASSING = ("pass", "info", "skipped")


class Options(CommandOptions):
    synopsis = "Usage: tools/gpu-check [options]"
    longdesc = ("Check the engine on a GPU (streaming against offline decoding, batch "
                "invariance, bfloat16 and float16 against float32, the CUDA-graph "
                "decoder) on random-weight replicas of the small and large models, "
                "then measure the server's throughput with the bench.  Defaults "
                "depend on --device: cuda, or cpu for a quick run of the same code "
                "with tiny replicas.")
    optFlags = [
        ("no-throughput", None, "Check the engine only."),
    ]
    optParameters = [
        ("device", None, "cuda", "PyTorch device: cuda, cuda:N or cpu."),
        ("out", None, None, "Folder for gpu-check.json, the bench reports and the "
         "server logs [default: a new temporary folder]."),
        ("cache-dir", None, os.path.expanduser("~/.cache/parakeet-server"),
         "Where replicas are built and kept between runs."),
        ("arch", None, None, "Comma-separated replicas to check [default: small,large "
         "on CUDA, tiny,tiny-lookaheads on the CPU]."),
        ("streams", None, None, "Streams in each engine check [8; 3 on the CPU].", int),
        ("audio-seconds", None, None, "Audio of the longest stream of an engine check, "
         "in seconds [4; 2 on the CPU].", float),
        ("seconds", None, None, "bench --seconds: audio per stream in each probe "
         "[5; 2 on the CPU].", float),
        ("ceiling-seconds", None, None, "bench --ceiling-seconds [2].", float),
        ("first-streams", None, None, "bench --streams: the first probe's streams "
         "[32; 1 on the CPU].", int),
        ("max-streams", None, None, "bench --max-streams [512; 4 on the CPU].", int),
        ("pause", None, None, "bench --pause, in seconds [1; 0 on the CPU].", float),
        ("budget", None, None, "Seconds the whole check should take: the throughput "
         "measurements share what the engine checks leave, each stopped at its share "
         "(at least %d s) with what it found so far [420; 600 on the CPU]."
         % (MIN_ALLOWANCE,), float),
        ("threads", None, None, "torch CPU threads of this process, the server and the "
         "bench's ceiling [default on CUDA: torch's own, but 2 for this process while "
         "replicas are built beside it; 1 for every process on the CPU, where they "
         "share it].", int),
    ]

    def postOptions(self):
        from ..engine.engine import parse_device

        try:
            self.kind = parse_device(self["device"])[0]
        except ValueError as e:
            raise usage.UsageError(str(e))
        for key, value in DEFAULTS[self.kind].items():
            if self[key] is None:
                self[key] = value
        self["arch"] = [name for name in self["arch"].split(",") if name]
        for name in self["arch"]:
            if name not in ARCHITECTURES and name not in STAND_INS:
                raise usage.UsageError("unknown replica %r (use %s)" % (
                    name, ", ".join(sorted(set(ARCHITECTURES) | set(STAND_INS)))))


# Replicas

def architecture(name):
    """The replica architecture called name."""
    return STAND_INS[name] if name in STAND_INS else ARCHITECTURES[name]


def trained_chunks_ms(name):
    """The chunk sizes, in ms, the replica called name is trained for; its
    default first."""
    contexts = architecture(name).att_context_size
    if isinstance(contexts[0], int):
        contexts = (contexts,)
    return [(lookahead + 1) * FRAME_MS for _, lookahead in contexts]


def replica_file(name, cache_dir):
    """Where the replica called name is kept: ``replica-NAME.nemo``, as
    :func:`parakeet.measuring.ceiling.replica_path` keeps them."""
    return os.path.join(cache_dir, "replica-%s.nemo" % (name,))


def build(name, cache_dir, threads):
    """Build the replica called name into cache_dir unless it is there, on
    threads torch threads (the build's greedy decoding runs many small
    operators, which more threads than free cores slow down badly)."""
    import torch

    from .ceiling import replica_path
    from .replica import build_replica

    torch.set_num_threads(threads)
    if name in ARCHITECTURES:
        return replica_path(name, cache_dir)
    path = replica_file(name, cache_dir)
    if not os.path.exists(path):
        os.makedirs(cache_dir, exist_ok=True)
        build_replica(STAND_INS[name], path)
    return path


def start_builds(names, cache_dir, out_dir, threads=None):
    """{name: child process building it} for the replicas not built yet, all
    at once, each on threads torch threads [default: a share of this
    machine's cores, two left for the checks]; each logs to out_dir."""
    missing = [n for n in names if not os.path.exists(replica_file(n, cache_dir))]
    threads = threads or max(1, ((os.cpu_count() or 1) - 2) // max(1, len(missing)))
    env = child_environment(threads)
    builds = {}
    for name in missing:
        code = ("import sys; from parakeet.measuring.gpucheck import build; "
                "build(sys.argv[1], sys.argv[2], int(sys.argv[3]))")
        with open(os.path.join(out_dir, "build-%s.log" % (name,)), "wb") as log:
            builds[name] = subprocess.Popen(
                [sys.executable, "-c", code, name, cache_dir, str(threads)],
                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    return builds


def wait_for_build(name, builds, cache_dir, out_dir):
    """The path of the replica called name once its build has ended."""
    process = builds.pop(name, None)
    if process is not None and process.wait() != 0:
        raise RuntimeError("building the %s replica failed (exit status %s): %s"
                           % (name, process.returncode,
                              last_line(os.path.join(out_dir, "build-%s.log" % (name,)))))
    return replica_file(name, cache_dir)


# Decoding for the engine checks

def with_engine(settings, path, chunk_ms, streams, f, precision=None,
                cuda_graph_decoder=False):
    """f(engine), the model at path loaded for a check of streams streams at
    chunk_ms; its memory, on the GPU too, is let go of after."""
    import torch

    from ..engine.engine import Engine

    engine = Engine.load(path, device=settings["device"], num_slots=streams,
                         batch_size=streams, chunk_ms=chunk_ms, precision=precision,
                         vad=False, cuda_graph_decoder=cuda_graph_decoder)
    try:
        return f(engine)
    finally:
        del engine
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def cuda_graphs_mode(engine):
    """How the engine's greedy decoder runs as CUDA graphs (NeMo's
    label-looping decoder's mode, set at its first call); None: it does not."""
    decoding = engine.pipeline.asr_model.asr_model.decoding.decoding
    mode = getattr(getattr(decoding, "decoding_computer", None), "cuda_graphs_mode", None)
    return None if mode is None else str(mode)


def check_audios(streams, seconds):
    """Calibration audio for each stream of a check, of lengths spread up to
    seconds and off the chunk grid."""
    from ..clients.audiofiles import calibration_audio

    return [calibration_audio(100 + i, seconds * (i + 1) / streams + 0.037 * i)
            for i in range(streams)]


def _drain(engine, cutter):
    tokens = []
    while (chunk := cutter.next_chunk()) is not None:
        tokens += engine.step([chunk])[0].token_ids
    return tokens


def stream_alone(engine, audio, stream_id, piece=1601):
    """The tokens of audio decoded as one live stream, pushed piece samples
    at a time and stepped chunk by chunk."""
    from ..contract import ChunkCutter

    cutter = ChunkCutter(stream_id, engine.geometry)
    tokens = []
    for start in range(0, len(audio), piece):
        cutter.push(audio[start:start + piece])
        tokens += _drain(engine, cutter)
    cutter.finish()
    return tokens + _drain(engine, cutter)


def streams_alone(engine, audios, first_id=1000):
    return [stream_alone(engine, audio, first_id + i) for i, audio in enumerate(audios)]


def decode_together(engine, audios, first_id=1, piece=2560):
    """The tokens of each of audios decoded in one batch: streams start in
    pairs, one piece apart, and each step takes every chunk that is ready.
    Returns (tokens per stream, the largest batch)."""
    from ..contract import ChunkCutter

    cutters = [ChunkCutter(first_id + i, engine.geometry) for i in range(len(audios))]
    tokens = [[] for _ in audios]
    largest = tick = 0
    while not all(cutter.done for cutter in cutters):
        for i, cutter in enumerate(cutters):
            offset = (tick - i // 2) * piece
            if offset >= 0 and not cutter.finished:
                cutter.push(audios[i][offset:offset + piece])
                if offset + piece >= len(audios[i]):
                    cutter.finish()
        chunks = [c for c in (cutter.next_chunk() for cutter in cutters) if c is not None]
        if chunks:
            largest = max(largest, len(chunks))
            for chunk, result in zip(chunks, engine.step(chunks)):
                tokens[chunk.stream_id - first_id] += result.token_ids
        tick += 1
    return tokens, largest


def edit_distance(a, b):
    """Levenshtein distance between two token sequences."""
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        current = [i]
        for j, y in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1,
                               previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


def agreement(expected, got):
    """How two decodings of the same streams compare: streams identical,
    streams, tokens expected, and token-level agreement (1 - edit distance
    over the longer side's tokens, summed over streams)."""
    identical = sum(a == b for a, b in zip(expected, got))
    distance = sum(edit_distance(a, b) for a, b in zip(expected, got))
    longest = sum(max(len(a), len(b)) for a, b in zip(expected, got))
    return {"identical": identical, "streams": len(expected),
            "tokens": sum(len(a) for a in expected),
            "agreement": 1.0 if not longest else round(1.0 - distance / longest, 4)}


def exact_row(model, check, expected, got, words):
    """A row that passes when got is expected, token for token."""
    a = agreement(expected, got)
    result = "pass" if a["identical"] == a["streams"] else "FAIL"
    detail = "%d/%d streams identical, %d tokens%s, %s" % (
        a["identical"], a["streams"], a["tokens"],
        "" if result == "pass" else " (token agreement %.4f)" % a["agreement"], words)
    return dict(row(model, check, result, detail), **a)


# The engine checks

def float32_checks(results, settings, model, path, chunk_ms, audios):
    """Streaming against offline decoding, and batch invariance, in
    float32; returns each stream's tokens decoded alone."""
    def decode(engine):
        return (streams_alone(engine, audios),
                [engine.decode_offline(audio)[0] for audio in audios],
                decode_together(engine, audios))

    alone, offline, (together, largest) = with_engine(
        settings, path, chunk_ms, len(audios), decode, "float32")
    results.add(exact_row(model, "streaming = offline", offline, alone, "float32"))
    results.add(exact_row(model, "batch invariance", alone, together,
                          "float32, batches of up to %d" % (largest,)))
    return alone


def precision_check(results, settings, model, path, chunk_ms, audios, precision,
                    reference):
    """precision against float32 (reference: the float32 streams alone):
    reported, not failed.  Returns (alone, together) in precision."""
    def decode(engine):
        if engine.precision != precision:
            raise RuntimeError("the engine runs in %s, not %s" % (engine.precision, precision))
        return streams_alone(engine, audios), decode_together(engine, audios)[0]

    # bfloat16 is the CUDA default: load it as the server does, unasked.
    asked = None if (settings.kind, precision) == ("cuda", "bfloat16") else precision
    alone, together = with_engine(settings, path, chunk_ms, len(audios), decode, asked)
    a = agreement(reference, alone)
    results.add(dict(row(model, "%s vs float32" % (precision,), "info",
                         "%d/%d streams identical, token agreement %.4f (%d tokens)"
                         % (a["identical"], a["streams"], a["agreement"], a["tokens"])), **a))
    return alone, together


def cuda_graph_check(results, settings, model, path, chunk_ms, audios, precision, plain):
    """The CUDA-graph greedy decoder against the plain one (plain: its
    (alone, together) tokens), both in precision."""
    def decode(engine):
        return (streams_alone(engine, audios), decode_together(engine, audios)[0],
                cuda_graphs_mode(engine))

    alone, together, mode = with_engine(settings, path, chunk_ms, len(audios), decode,
                                        precision, cuda_graph_decoder=True)
    if mode is None:
        results.add(row(model, "cuda-graph decoder", "FAIL",
                        "the greedy decoder ran without CUDA graphs"))
        return
    results.add(exact_row(model, "cuda-graph decoder", plain[0] + plain[1], alone + together,
                          "%s, alone and in a batch, CUDA graphs %s" % (precision, mode)))


def check_engine(results, settings, name, path):
    """Every engine check of the replica called name, at path."""
    audios = check_audios(settings["streams"], settings["audio-seconds"])
    chunks = trained_chunks_ms(name)
    reference = None
    for chunk_ms in chunks:
        model = "%s@%d" % (name, chunk_ms)
        alone = results.stage(model, "streaming = offline", float32_checks,
                              results, settings, model, path, chunk_ms, audios)
        if chunk_ms == chunks[0]:
            reference = alone
    model = "%s@%d" % (name, chunks[0])
    if reference is None:
        return
    cuda = settings.kind == "cuda"
    plain = results.stage(model, "bfloat16 vs float32", precision_check, results, settings,
                          model, path, chunks[0], audios, "bfloat16", reference)
    if cuda:
        results.stage(model, "float16 vs float32", precision_check, results, settings,
                      model, path, chunks[0], audios, "float16", reference)
        if plain is not None:
            results.stage(model, "cuda-graph decoder", cuda_graph_check, results, settings,
                          model, path, chunks[0], audios, "bfloat16", plain)
    else:
        results.add(row(model, "float16 vs float32", "skipped", "CUDA only"))
        results.add(row(model, "cuda-graph decoder", "skipped", "CUDA only"))


# Throughput

def child_environment(threads=None):
    """This process's environment for the children, with the repository
    importable and nothing downloaded; threads: torch's CPU threads."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if ROOT not in paths:
        paths.append(ROOT)
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def last_line(path):
    """The last line of a log file, for an error message."""
    try:
        with open(path, "rb") as f:
            lines = f.read().decode("utf-8", "replace").strip().splitlines()
    except OSError:
        return ""
    return lines[-1] if lines else ""


def start_server(path, settings, chunk_ms, log_path, env):
    """``parakeet-server serve`` of the replica at path, on free loopback ports."""
    argv = [sys.executable, "-m", "parakeet", "serve", "--model", path,
            "--device", settings["device"], "--chunk-ms", str(chunk_ms),
            "--host", "127.0.0.1", "--port", "0", "--ws-port", "0",
            "--max-num-streams", str(settings["max-streams"]), "--drain-seconds", "2"]
    with open(log_path, "wb") as log:
        return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)


def wait_until_ready(server, log_path, timeout):
    """The WebSocket port of the server once its log says it is ready."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(log_path, "rb") as f:
            text = f.read().decode("utf-8", "replace")
        port = re.search(r"listening for WebSocket clients on 127\.0\.0\.1:(\d+)", text)
        if port and "ready: serving " in text:
            return int(port.group(1))
        if server.poll() is not None:
            raise RuntimeError("the server exited with status %s: %s"
                               % (server.returncode, last_line(log_path)))
        time.sleep(0.2)
    raise RuntimeError("the server was not ready within %.0f s" % (timeout,))


def stop(process, grace=30.0):
    """SIGTERM, then SIGKILL after grace seconds; the exit status."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            process.kill()
    return process.wait()


def bench_argv(settings, path, port, server_pid, json_path):
    return [sys.executable, "-m", "parakeet", "bench",
            "--url", "ws://127.0.0.1:%d" % (port,), "--binary", "--find-max",
            "--streams", str(settings["first-streams"]),
            "--max-streams", str(settings["max-streams"]),
            "--seconds", str(settings["seconds"]), "--pause", str(settings["pause"]),
            "--server-pid", str(server_pid), "--json", json_path,
            "--ceiling-model", path, "--ceiling-device", settings["device"],
            "--ceiling-seconds", str(settings["ceiling-seconds"])] + (
                ["--ceiling-threads", str(settings["threads"])] if settings["threads"] else [])


def run_bench(argv, log_path, env, timeout):
    """Run the bench; True when it ended by itself, False when it was
    stopped at timeout seconds."""
    with open(log_path, "wb") as log:
        bench = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    try:
        bench.wait(max(1.0, timeout))
        return True
    except subprocess.TimeoutExpired:
        stop(bench, grace=5.0)
        return False


def from_report(report):
    """What a finished bench found (its --json report): streams sustained,
    latency at that N, the ceiling's N."""
    best = report["find_max"]["max_streams"]
    at_best = [run for run in report["runs"] if run["streams"] == best]
    latency = at_best[-1]["latency_ms"] if at_best else {}
    failed = [p["streams"] for p in report["find_max"]["probes"]
              if not p["passed"] and p["streams"] > best]
    return {"sustained": best, "fails_at": min(failed, default=None),
            "p50_ms": latency.get("p50"), "p95_ms": latency.get("p95"),
            "ceiling": (report["ceiling"] or {}).get("max_streams"), "complete": True}


#: A row of the bench's table: N, opened, kept-up, results, p50, p95, ... verdict.
TABLE_ROW = re.compile(r"^\s*(\d+)\s+\d+\s+\d+/\d+\s+\d+\s+(\S+)\s+(\S+)\s.*?\s(\S+)$")
CEILING_PACED = re.compile(r"^ceiling N=(\d+) paced: .*: (pass|fail)$")


def from_output(text):
    """What a bench stopped part-way printed: the probes so far."""
    def number(value):
        return None if value == "-" else float(value)

    runs = [(int(m.group(1)), number(m.group(2)), number(m.group(3)), m.group(4) == "pass")
            for m in map(TABLE_ROW.match, text.splitlines()) if m]
    ceiling = [(int(m.group(1)), m.group(2) == "pass")
               for m in map(CEILING_PACED.match, text.splitlines()) if m]
    passed = [r for r in runs if r[3]]
    best = max(passed, default=(0, None, None, True))
    return {"sustained": best[0],
            "fails_at": min([n for n, _, _, ok in runs if not ok and n > best[0]], default=None),
            "p50_ms": best[1], "p95_ms": best[2],
            "ceiling": max([n for n, ok in ceiling if ok], default=None)
            if ceiling else None, "complete": False}


def throughput_words(found, limit):
    """A throughput measurement in a line; limit: the bench's --max-streams."""
    words = "N=%d sustained" % (found["sustained"],)
    if found["fails_at"] is not None:
        words += " (N=%d fails)" % (found["fails_at"],)
    elif found["sustained"] == limit:
        words += " (the --max-streams limit)"
    if found["p50_ms"] is not None:
        words += ", p50 %.0f ms, p95 %.0f ms" % (found["p50_ms"], found["p95_ms"])
    words += ", ceiling N=%s" % ("-" if found["ceiling"] is None else found["ceiling"],)
    if "ceiling_chunk_ms" in found:
        words += " (at %d ms chunks)" % (found["ceiling_chunk_ms"],)
    if not found["complete"]:
        words += "; stopped at its time limit"
    return words


def bench_found(base, finished):
    """What the bench whose files start with base found: from its report
    when it finished, else from what it printed before it was stopped."""
    if finished and os.path.exists(base + "-bench.json"):
        with open(base + "-bench.json") as f:
            return from_report(json.load(f))
    with open(base + "-bench.log", "rb") as f:
        return from_output(f.read().decode("utf-8", "replace"))


def measure_throughput(results, settings, name, path, chunk_ms, allowance):
    """The server's streams at chunk_ms, by the bench's --find-max, in about
    allowance seconds."""
    started = time.monotonic()
    env = child_environment(settings["threads"])
    base = os.path.join(results.out_dir, "%s-%d" % (name, chunk_ms))
    server = start_server(path, settings, chunk_ms, base + "-server.log", env)
    try:
        port = wait_until_ready(server, base + "-server.log", allowance)
        argv = bench_argv(settings, path, port, server.pid, base + "-bench.json")
        finished = run_bench(argv, base + "-bench.log", env,
                             allowance - (time.monotonic() - started))
    finally:
        stop(server)
    found = bench_found(base, finished)
    if chunk_ms != trained_chunks_ms(name)[0]:
        # The bench's ceiling loads the model at its own chunk size.
        found["ceiling_chunk_ms"] = trained_chunks_ms(name)[0]
    result = "pass" if found["sustained"] > 0 else "FAIL"
    results.add(dict(row("%s@%d" % (name, chunk_ms), "throughput", result,
                         throughput_words(found, settings["max-streams"])),
                     seconds=round(time.monotonic() - started, 1), **found))


def throughput_configs(names):
    """(replica, chunk ms) of each throughput measurement."""
    return [(name, chunk_ms) for name in names for chunk_ms in trained_chunks_ms(name)
            if chunk_ms in THROUGHPUT_CHUNKS_MS]


# Results

def row(model, check, result, detail):
    return {"model": model, "check": check, "result": result, "detail": detail}


def one_line(exc):
    text = str(exc).strip().splitlines()
    return "%s: %s" % (type(exc).__name__, text[0] if text else "")


class Results:
    """The rows found so far, kept in out_dir's gpu-check.json after each."""

    def __init__(self, out_dir, meta, out=None):
        self.out_dir = out_dir
        self.meta = meta
        self.rows = []
        self.out = out or sys.stdout
        self.started = time.monotonic()

    def say(self, line):
        print("[%6.1f s] %s" % (time.monotonic() - self.started, line), file=self.out,
              flush=True)

    def add(self, found):
        found.setdefault("at_s", round(time.monotonic() - self.started, 1))
        self.rows.append(found)
        self.say("%s %s: %s (%s)" % (found["model"], found["check"], found["result"],
                                      found["detail"]))
        self.save()

    def stage(self, model, check, f, *args):
        """f(*args), or None after a row saying how it failed."""
        self.say("%s: %s ..." % (model, check))
        try:
            return f(*args)
        except Exception as e:
            with open(os.path.join(self.out_dir, "errors.log"), "a") as log:
                log.write("%s %s:\n%s\n" % (model, check, traceback.format_exc()))
            self.add(row(model, check, "error", one_line(e)))
            return None

    @property
    def passed(self):
        return bool(self.rows) and all(r["result"] in PASSING for r in self.rows)

    def save(self, finished=False):
        report = dict(self.meta, rows=self.rows, finished=finished, passed=self.passed,
                      elapsed_s=round(time.monotonic() - self.started, 1))
        path = os.path.join(self.out_dir, "gpu-check.json")
        with open(path + ".partial", "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
        os.replace(path + ".partial", path)
        return path

    def table(self):
        """Every row, aligned."""
        header = ("model", "check", "result", "detail")
        lines = [header] + [tuple(r[k] for k in header) for r in self.rows]
        widths = [max(len(line[i]) for line in lines) for i in range(3)]
        return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths))
                         + "  " + line[3] for line in lines)


def machine(settings):
    """What the check ran on, for the JSON."""
    import torch

    found = {"device": settings["device"], "torch": torch.__version__,
             "python": sys.version.split()[0], "cpus": os.cpu_count()}
    if settings.kind == "cuda":
        found["gpu"] = torch.cuda.get_device_name(settings["device"])
    return found


def engine_stages(results, options):
    """Build the replicas, side by side, and check the engine on each as
    soon as it is built; {name: its path, or None where it failed}."""
    import torch

    own_threads = options["threads"] or torch.get_num_threads()
    torch.set_num_threads(options["threads"] or 2)
    builds = start_builds(options["arch"], options["cache-dir"], results.out_dir,
                          options["threads"])
    paths = {}
    for name in options["arch"]:
        paths[name] = results.stage(name, "replica", wait_for_build, name, builds,
                                    options["cache-dir"], results.out_dir)
        if not builds:
            torch.set_num_threads(own_threads)
        if paths[name] is not None:
            results.say("%s: replica at %s" % (name, paths[name]))
            results.stage(name, "engine", check_engine, results, options, name, paths[name])
    return paths


def throughput_stages(results, options, paths, deadline):
    """Each throughput measurement, sharing what is left until deadline."""
    configs = [c for c in throughput_configs(options["arch"]) if paths[c[0]] is not None]
    for i, (name, chunk_ms) in enumerate(configs):
        allowance = max(MIN_ALLOWANCE, (deadline - time.monotonic()) / (len(configs) - i))
        results.stage("%s@%d" % (name, chunk_ms), "throughput", measure_throughput,
                      results, options, name, paths[name], chunk_ms, allowance)


def main(argv=None, out=None):
    """``tools/gpu-check``: returns the exit status."""
    options = Options()
    try:
        options.parseOptions(sys.argv[1:] if argv is None else argv)
    except usage.UsageError as e:
        raise SystemExit("%s\ngpu-check: %s" % (options, e))
    out_dir = options["out"] or tempfile.mkdtemp(prefix="gpu-check-")
    os.makedirs(out_dir, exist_ok=True)
    results = Results(out_dir, {
        "started_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "settings": {k: v for k, v in options.items() if k != "help"},
        "machine": machine(options)}, out)
    results.say("gpu-check on %s: results in %s" % (options["device"], out_dir))
    deadline = time.monotonic() + options["budget"]
    paths = engine_stages(results, options)
    if not options["no-throughput"]:
        throughput_stages(results, options, paths, deadline)
    path = results.save(finished=True)
    print("\n" + results.table(), file=results.out, flush=True)
    results.say("%d rows, %d not passed; %s" % (
        len(results.rows), sum(r["result"] not in PASSING for r in results.rows), path))
    return 0 if results.passed else 1


if __name__ == "__main__":
    sys.exit(main())
