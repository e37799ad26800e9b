"""
How fast the engine decodes with no sockets and no reactor: the ceiling that
the server's own throughput is measured against.

    python -m parakeet.measuring.ceiling --arch small --streams 1,2,4,8

builds (once, then reuses) a random-weight replica of the named architecture,
drives N streams in lockstep through :meth:`Engine.step`, one chunk each per
step, and prints per step time and the real-time factor.  A stream keeps up
in real time while a step of N streams takes less than one chunk of audio.

:class:`Ceiling` drives the served model the same way for
``parakeet-server bench --ceiling-model``, at each N the bench probes.
"""

import gc
import os
import statistics
import sys
import time

import numpy as np
from twisted.python import usage


class Options(usage.Options):
    optFlags = [
        ("no-fast-encoder", None, "Run NeMo's own streaming encoder step."),
        ("paced", None, "Also decode the streams as the server does: audio in real "
         "time, starts staggered, each step taking whatever is ready."),
    ]
    optParameters = [
        ("arch", None, "small", "Replica architecture: small, large or tiny."),
        ("model", None, None, "A .nemo file to measure instead of a replica."),
        ("cache-dir", None, os.path.expanduser("~/.cache/parakeet-server"),
         "Where replicas are kept between runs."),
        ("streams", None, "1,2,4,8", "Comma-separated stream counts to measure."),
        ("seconds", None, 8.0, "Audio per stream, in seconds.", float),
        ("device", None, "cpu", "PyTorch device."),
        ("precision", None, None, "Model arithmetic, as serve --precision."),
        ("threads", None, None, "torch CPU threads [default: torch's own].", int),
    ]


def replica_path(arch, cache_dir):
    from .replica import build_replica

    path = os.path.join(cache_dir, "replica-%s.nemo" % (arch,))
    if not os.path.exists(path):
        os.makedirs(cache_dir, exist_ok=True)
        print("building the %s replica at %s ..." % (arch, path), flush=True)
        build_replica(arch, path)
    return path


def stream_audio(engine, i, seconds, audio=None):
    """Stream i's audio: audio (samples at the engine's rate) looped or cut
    to seconds, as the bench sends it to every stream; without it,
    :func:`parakeet.clients.audiofiles.calibration_audio`."""
    from ..clients.audiofiles import calibration_audio

    if audio is None:
        return calibration_audio(i, seconds)
    return np.resize(audio, int(engine.sample_rate * seconds))


def measure(engine, n_streams, seconds, first_id, audio=None):
    """Per-step wall times (s) of n_streams decoded together, one chunk each
    (audio: as :func:`stream_audio`)."""
    from ..contract import ChunkCutter

    cutters = []
    for i in range(n_streams):
        cutter = ChunkCutter(first_id + i, engine.geometry)
        cutter.push(stream_audio(engine, i, seconds, audio))
        cutter.finish()
        cutters.append(cutter)
    times = []
    while True:
        chunks = [c for c in (cutter.next_chunk() for cutter in cutters) if c is not None]
        if not chunks:
            return times
        started = time.perf_counter()
        engine.step(chunks)
        if len(chunks) == n_streams and not any(c.is_first or c.is_last for c in chunks):
            times.append(time.perf_counter() - started)


def measure_paced(engine, n_streams, seconds, first_id, stagger=None, message_ms=100,
                  clock=time.perf_counter, sleep=time.sleep, audio=None):
    """n_streams decoded as the server decodes them, with no sockets and no
    reactor: each stream's audio arrives in real time in message_ms pieces,
    the streams' starts spread evenly over stagger seconds (default: as
    ``parakeet-server bench``), and whenever the engine is idle it steps the
    next chunk of every stream that has one.

    Returns (latencies, times_to_final) in seconds: a result's latency is
    the end of its step minus the arrival of the piece that completed its
    chunk, as the bench measures it over a socket; time to final is from the
    arrival of a stream's last piece to the end of the step of its last
    chunk.  audio: as :func:`stream_audio`.
    """
    from ..contract import ChunkCutter

    if stagger is None:
        stagger = min(seconds / 4, 5.0)
    piece = int(engine.sample_rate * message_ms / 1000)
    streams = []
    for i in range(n_streams):
        samples = stream_audio(engine, i, seconds, audio)
        streams.append({
            "cutter": ChunkCutter(first_id + i, engine.geometry),
            "pieces": [samples[k:k + piece] for k in range(0, len(samples), piece)],
            "start": stagger * i / n_streams, "sent": 0, "arrived": [], "served": 0})
    latencies, finals = [], []
    started = clock()
    step_number = 0
    while any(not s["cutter"].done for s in streams):
        now = clock() - started
        next_arrival = None
        for s in streams:
            pieces = s["pieces"]
            while s["sent"] < len(pieces):
                due = s["start"] + (s["sent"] + 1) * message_ms / 1000.0
                if due > now:
                    next_arrival = due if next_arrival is None else min(next_arrival, due)
                    break
                s["cutter"].push(pieces[s["sent"]])
                s["sent"] += 1
                s["arrived"].append((s["cutter"].received, due))
                if s["sent"] == len(pieces):
                    s["cutter"].finish()
        ready = sorted((s for s in streams if s["cutter"].ready), key=lambda s: s["served"])
        if not ready:
            if next_arrival is None:
                raise RuntimeError("streams left undecoded with no audio to come")
            sleep(max(0.0, next_arrival - (clock() - started)))
            continue
        step_number += 1
        chunks = []
        for s in ready:
            s["served"] = step_number
            chunks.append(s["cutter"].next_chunk())
        engine.step(chunks)
        done = clock() - started
        for s, chunk in zip(ready, chunks):
            arrived = next(at for received, at in s["arrived"] if received >= chunk.audio_samples)
            (finals if chunk.is_last else latencies).append(done - arrived)
    return latencies, finals


def paced_summary(latencies, finals, bound=0.320, keep_up=1.0):
    """What the bench reports of a run, from :func:`measure_paced`'s result
    (seconds in, ms out): whether every result kept up (within keep_up) and
    p95 latency stayed within bound."""
    everything = latencies + finals
    p50, p95 = step_percentiles(latencies) if latencies else (None, None)
    return {"latency_p50_ms": None if p50 is None else round(p50 * 1000, 1),
            "latency_p95_ms": None if p95 is None else round(p95 * 1000, 1),
            "latency_max_ms": round(max(everything) * 1000, 1) if everything else None,
            "ttf_p50_ms": round(statistics.median(finals) * 1000, 1) if finals else None,
            "passes": bool(latencies) and max(everything) <= keep_up and p95 <= bound}


def step_percentiles(times):
    """(p50, p95) of step wall times, as the table reports them."""
    return statistics.median(times), sorted(times)[int(0.95 * (len(times) - 1))]


# The bench's ceiling

def _ms(seconds):
    return None if seconds is None else round(seconds * 1000.0, 3)


def load_engine(path, device, capacity, precision=None):
    """The model at path, ready to decode capacity streams in one step."""
    from ..engine.engine import Engine

    return Engine.load(path, device=device, num_slots=capacity, batch_size=capacity,
                       precision=precision)


class Ceiling:
    """The served model driven in-process, as ``parakeet-server bench
    --ceiling-model`` probes it: what the engine can do at N streams with no
    sockets and no reactor."""

    def __init__(self, path, device, seconds, threads=None, precision=None,
                 p95_ms=320.0, keep_up_ms=1000.0, message_ms=100, stagger=None,
                 source=None):
        """stagger: seconds over which the paced streams' starts spread
        [default: as :func:`measure_paced` spreads them]; source: the
        :class:`~parakeet.clients.audiofiles.AudioSource` every stream
        decodes [default: the replica's calibration audio]."""
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
        times = measure(self.engine, n, self.seconds, self._next_id, audio)
        self._next_id += n
        chunk = self.engine.geometry.chunk_seconds
        result = {"streams": n, "steps": 0, "step_p50_ms": None, "step_p95_ms": None,
                  "chunk_ms": _ms(chunk), "fits": False}
        if times:
            p50, p95 = step_percentiles(times)
            result.update(steps=len(times), step_p50_ms=_ms(p50), step_p95_ms=_ms(p95),
                          fits=p95 < chunk)
        paced = measure_paced(self.engine, n, self.seconds, self._next_id,
                              stagger=self.stagger, message_ms=self.message_ms, audio=audio)
        self._next_id += n
        result["paced"] = paced_summary(*paced, bound=self.p95_ms / 1000.0,
                                        keep_up=self.keep_up_ms / 1000.0)
        result["passed"] = result["paced"]["passes"]
        return result

    def close(self):
        self.engine = None
        gc.collect()


def main(argv=None):
    options = Options()
    try:
        options.parseOptions(sys.argv[1:] if argv is None else argv)
    except usage.UsageError as e:
        raise SystemExit("%s\n%s" % (options, e))
    import torch

    from ..engine.engine import Engine

    if options["threads"]:
        torch.set_num_threads(options["threads"])
    counts = [int(n) for n in options["streams"].split(",")]
    path = options["model"] or replica_path(options["arch"], options["cache-dir"])
    started = time.perf_counter()
    engine = Engine.load(path, device=options["device"], num_slots=max(counts),
                         batch_size=max(counts), precision=options["precision"],
                         fast_encoder=not options["no-fast-encoder"])
    chunk = engine.geometry.chunk_seconds
    print("model %s on %s in %s, %d torch threads: loaded in %.1f s, %.0f ms chunks"
          % (path, engine.device, engine.precision, torch.get_num_threads(),
             time.perf_counter() - started, chunk * 1000))
    print("%8s %12s %12s %10s %14s" % ("streams", "step p50 ms", "step p95 ms",
                                       "RTF", "real time?"))
    first_id = 1
    for n in counts:
        times = measure(engine, n, options["seconds"], first_id)
        first_id += n
        p50, p95 = step_percentiles(times)
        # Real-time factor of the batch: compute time per second of audio
        # of each stream.
        rtf = p50 / chunk
        print("%8d %12.1f %12.1f %10.3f %14s"
              % (n, p50 * 1000, p95 * 1000, rtf, "yes" if p95 < chunk else "no"),
              flush=True)
        if options["paced"]:
            paced = paced_summary(*measure_paced(engine, n, options["seconds"], first_id))
            first_id += n
            print("%8s paced: latency p50 %s ms, p95 %s ms, max %s ms; time to final p50 "
                  "%s ms: %s" % ("", paced["latency_p50_ms"], paced["latency_p95_ms"],
                                 paced["latency_max_ms"], paced["ttf_p50_ms"],
                                 "passes" if paced["passes"] else "fails"), flush=True)


if __name__ == "__main__":
    main()
