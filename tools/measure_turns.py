"""
Measure turn detection on held-out speech, and what it costs.

Streams "conversations" (held-out utterances of the demo model's corpus back
to back, with the silences the corpus put around them) to a server on
loopback running the demo model, and reports:

* segmentation: utterances found against sentences spoken, and for each
  found boundary how far the utterance's end (its last word) lies from the
  sentence's recorded end of speech, and how much audio the server had
  needed before it announced the end (detection delay);
* word error rate of the utterances against the sentences;
* voice activity detection cost per stream-second, batched, and the
  resampler's cost per stream-second from 8, 44.1 and 48 kHz.

    python tools/measure_turns.py MANIFEST [--per-stream 5] [--streams 8]

MANIFEST is a held-out manifest written by ``parakeet.training.corpus.write_set``
(``tests/data/heldout/manifest.json``, or ``heldout.json`` of a training
run's work folder).
"""

import argparse
import base64
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402


def load_conversations(manifest, per_stream, streams):
    import soundfile

    from parakeet.training import corpus

    rows = corpus.read_manifest(manifest)
    folder = os.path.dirname(os.path.abspath(manifest))
    conversations = []
    for s in range(streams):
        chunk = rows[s * per_stream:(s + 1) * per_stream]
        if len(chunk) < per_stream:
            break
        pieces, sentences, offset = [], [], 0
        for row in chunk:
            audio, _ = soundfile.read(os.path.join(folder, row["audio_filepath"]),
                                      dtype="float32")
            pieces.append(audio)
            sentences.append((row["text"].replace(corpus.EOU, ""),
                              1000 * (offset / 16000 + row["speech_end"])))
            offset += len(audio)
        conversations.append((np.concatenate(pieces), sentences))
    return conversations


def segmentation(reactor, conversations):
    from twisted.internet import defer

    from parakeet.clients import connection
    from parakeet.training import corpus
    from parakeet.server import tap
    from parakeet.audio import encode_samples

    options = tap.Options()
    options.parseOptions(["--model", "demo", "--device", "cpu", "--host", "127.0.0.1",
                          "--port", "0", "--ws-port", "0"])
    server = tap.makeService(options, reactor)
    server.startService()
    port = server.getServiceNamed("TCP clients").port.getHost().port

    @defer.inlineCallbacks
    def one(audio):
        client = yield connection.connect(reactor, "tcp://127.0.0.1:%d" % port)
        yield client.next(lambda m: m["type"] == "hello")
        for start in range(0, len(audio), 1600):
            payload = encode_samples(audio[start:start + 1600])
            client.send({"type": "audio", "data": base64.b64encode(payload).decode()})
        client.close()
        yield client.final()
        return client.results()

    @defer.inlineCallbacks
    def run():
        results = yield defer.gatherResults([one(audio) for audio, _ in conversations])
        yield server.stopService()
        expected = found = matched = 0
        end_errors, delays, pairs = [], [], []
        for (_, sentences), stream in zip(conversations, results):
            ends = [(r["utterance"], r["audio_ms"]) for r in stream if "utterance" in r]
            expected += len(sentences)
            found += len(ends)
            # Pair each sentence with the utterance ending nearest its end.
            for text, end_ms in sentences:
                if not ends:
                    pairs.append((text, ""))
                    continue
                utterance, heard = min(ends, key=lambda e: abs(e[0]["end_ms"] - end_ms))
                pairs.append((text, utterance["text"]))
                if abs(utterance["end_ms"] - end_ms) < 1000:
                    matched += 1
                    end_errors.append(utterance["end_ms"] - end_ms)
                    delays.append(heard - end_ms)
        absolute = sorted(abs(e) for e in end_errors)
        return {
            "streams": len(conversations), "sentences": expected,
            "utterances_found": found, "boundaries_matched_within_1s": matched,
            "end_error_ms_median": statistics.median(end_errors),
            "end_abs_error_ms_median": statistics.median(absolute),
            "end_abs_error_ms_p90": absolute[int(0.9 * (len(absolute) - 1))],
            "end_abs_error_ms_max": absolute[-1],
            "detection_delay_ms_median": statistics.median(delays),
            "detection_delay_ms_p90": sorted(delays)[int(0.9 * (len(delays) - 1))],
            "wer": round(corpus.word_error_rate(pairs), 4),
        }

    return run()


def costs(audio):
    """CPU ms per stream-second of voice activity detection and resampling."""
    import torch

    from parakeet.audio import Resampler
    from parakeet.engine.vad import VoiceActivity

    torch.set_num_threads(1)
    report = {}
    seconds = len(audio) / 16000
    for streams in (1, 16, 64):
        vad = VoiceActivity()
        started = time.process_time()
        for start in range(0, len(audio), 2560):  # 160 ms steps, all streams batched
            vad({i: audio[start:start + 2560] for i in range(streams)})
        spent = time.process_time() - started
        report["vad_ms_per_stream_second_batch_%d" % streams] = round(
            1000 * spent / (streams * seconds), 3)
    for rate in (8000, 44100, 48000):
        import soxr

        source = soxr.resample(audio, 16000, rate).astype(np.float32)
        resampler = Resampler(rate, 16000)
        piece = rate // 10
        started = time.process_time()
        for start in range(0, len(source), piece):
            resampler(source[start:start + piece])
        report["resample_%d_ms_per_stream_second" % rate] = round(
            1000 * (time.process_time() - started) / seconds, 3)
    return report


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    parser.add_argument("manifest")
    parser.add_argument("--per-stream", type=int, default=5)
    parser.add_argument("--streams", type=int, default=8)
    args = parser.parse_args(argv)

    from twisted.internet import reactor

    from parakeet.engine.nemo.loading import quiet_nemo

    quiet_nemo()
    conversations = load_conversations(args.manifest, args.per_stream, args.streams)
    report = {}
    d = segmentation(reactor, conversations)
    d.addCallback(report.update)
    d.addErrback(lambda failure: report.update(error=failure.getTraceback()))
    d.addBoth(lambda _: reactor.stop())
    reactor.run()
    report.update(costs(conversations[0][0]))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
