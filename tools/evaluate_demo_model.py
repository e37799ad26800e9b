"""
How well the demo model hears: word error rate per held-out voice, on the
voices it was trained on (with texts it never read), on text outside its
templates (digit strings, numbers alone, single words; digit strings read
out a few digits at a time, as people read a phone number), in noise and
reverberation, over a telephone (8 kHz, G.711), and where it marks the end
of an utterance; and, where Debian's pocketsphinx-testdata is installed, on
its few recordings of people saying the domain's words; and, where Debian's
asterisk-core-sounds-en-wav is installed, on digit strings and numbers
spoken by a person: its recorded prompts (one speaker, 8 kHz) of single
digits, numbers and words put one after another.

    python tools/evaluate_demo_model.py [--model parakeet/data/demo.nemo] [--work DIR]

The evaluation sets are synthesised into --work on the first run (fixed
seeds, none of them from a training voice but the "heard" rows) and reused
after.  Prints one table; --json writes the numbers too.
"""

import argparse
import json
import os
import statistics
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from parakeet.training import augment, corpus, voices  # noqa: E402

#: Recordings of people in Debian's pocketsphinx-testdata whose words are
#: all the domain's: (file under its data folder, transcript).  The rest of
#: its clips say card names and prose, which the demo model cannot know.
HUMAN_DIR = "/usr/share/pocketsphinx/test/data"
HUMAN_CLIPS = (("tidigits/dhd.2934z.raw", "two nine three four zero"),
               ("cards/004.wav", "five five"))

#: Asterisk's English prompts: one speaker's recordings, a word or number
#: a file, at 8 kHz.
PROMPTS_DIR = "/usr/share/asterisk/sounds/en_US_f_Allison"

SEED = 7_000_000


def _heldout_all():
    return voices.Pool([row for pool in voices.HELDOUT.values() for row in pool.rows])


def set_specs():
    """(name, pool, text maker, dictate) of every synthesised evaluation
    set; dictate: read out a few words at a time (``corpus.dictated``)."""
    specs = [("held out: " + name, pool, corpus.mixed_text, False)
             for name, pool in sorted(voices.HELDOUT.items())]
    for engine in voices.TRAIN.engines():
        rows = [row for row in voices.TRAIN.rows if row[0] == engine]
        specs.append(("heard: " + engine, voices.Pool(rows), corpus.sentence, False))
    for kind in ("digits", "number", "word"):
        specs.append(("out of template: " + kind, _heldout_all(), corpus.text_of_kind(kind),
                      False))
    specs.append(("out of template: digits read out", _heldout_all(),
                  corpus.text_of_kind("digits"), True))
    return specs


def build_sets(work, per_set):
    """{name: manifest rows} for the sets whose engines are installed,
    synthesised into work unless already there."""
    sets = {}
    for i, (name, pool, text, dictate) in enumerate(set_specs()):
        pool = pool.installed()
        if not pool.rows:
            continue
        directory = os.path.join(work, "set%02d" % i)
        manifest = os.path.join(directory, "manifest.json")
        if not os.path.exists(manifest):
            corpus.write_set(directory, per_set, pool, SEED + i, text=text, dictate=dictate)
        sets[name] = corpus.read_manifest(manifest)
    return sets


#: Conditions put on the held-out voices' clips: name -> effect(audio, rng,
#: babble), babble being other speech to murmur from.
CONDITIONS = {
    "pink noise 10 dB": lambda a, r, b: augment.noise(a, r, snr=10, kind="pink")[0],
    "babble 10 dB": lambda a, r, b: augment.noise(a, r, babble=b, snr=10, kind="babble")[0],
    "reverb rt60 0.6 s": lambda a, r, b: augment.reverberate(a, r, rt60=0.6)[0],
    "reverb 0.6 s + pink 15 dB": lambda a, r, b: augment.noise(
        augment.reverberate(a, r, rt60=0.6)[0], r, snr=15, kind="pink")[0],
    "telephone 8 kHz u-law": lambda a, r, b: augment.telephone(a, law="mu")[0],
    "telephone 8 kHz A-law": lambda a, r, b: augment.telephone(a, law="a")[0],
}


def no_speech(rng):
    """(name, audio) of sounds with no words in them: what a model that
    memorised sentences fills with one."""
    silence = np.zeros(3 * 16000, np.float32)
    quiet = np.full(len(silence), 0.3, np.float32)
    return [("digital silence", silence)] + [
        ("%s noise" % kind, augment.noise(quiet, rng, snr=30 - level, kind=kind)[0] - quiet)
        for kind, level in (("white", 0), ("pink", 10), ("brown", 20), ("hum", 10))]


def _read(row):
    import soundfile

    return soundfile.read(row["audio_filepath"], dtype="float32")[0]


def decode_streaming(engine, audios, batch=16):
    """Token ids the server's engine emits for each of audios, decoded as
    concurrent streams, batch at a time, one chunk of each per step (the
    engine is batch-invariant, so this is what each would get alone)."""
    from parakeet.contract import ChunkCutter

    tokens = []
    for start in range(0, len(audios), batch):
        cutters = []
        for i, audio in enumerate(audios[start:start + batch]):
            cutter = ChunkCutter(i + 1, engine.geometry)
            cutter.push(audio)
            cutter.finish()
            cutters.append(cutter)
        these = [[] for _ in cutters]
        while True:
            chunks = [c for c in (cutter.next_chunk() for cutter in cutters) if c is not None]
            if not chunks:
                break
            for result in engine.step(chunks):
                these[result.stream_id - 1] += result.token_ids
        tokens += these
    return tokens


def _score(engine, decoded, texts, audios=None):
    """The WER of decoded ((tokens, frames, features) of each clip, offline)
    against texts; with audios, also on how many clips streaming gives the
    offline tokens."""
    hyps = [engine.text_of(tokens) for tokens, _, _ in decoded]
    row = {"clips": len(decoded), "words": sum(len(t.split()) for t in texts),
           "wer": round(corpus.word_error_rate(zip(texts, hyps)), 4),
           "examples": [[t, h] for t, h in zip(texts, hyps) if t != h][:3]}
    if audios is not None:
        live = decode_streaming(engine, audios)
        row["streaming_identical"] = sum(a == b[0] for a, b in zip(live, decoded))
    return row


def _decode(engine, audios):
    return [engine.decode_offline(audio) for audio in audios]


def end_of_utterance(engine, rows, decoded, frame_ms=80):
    """Where <EOU> comes against each row's recorded end of speech, from
    decoded ((tokens, frames, features) of each row's clip, offline)."""
    eou = engine.pipeline.asr_model.tokenizer.token_to_id(corpus.EOU)
    delays, missing, extra = [], 0, 0
    for row, (tokens, frames, _) in zip(rows, decoded):
        at = [f for t, f in zip(tokens, frames) if t == eou]
        if not at:
            missing += 1
            continue
        extra += len(at) - 1
        # The frame's audio ends (f + 1) frames in; the look-ahead adds one.
        delays.append((at[0] + 2) * frame_ms - 1000 * row["speech_end"])
    absolute = sorted(abs(d) for d in delays)
    return {"utterances": len(rows), "missing": missing, "extra": extra,
            "delay_ms_median": round(statistics.median(delays)) if delays else None,
            "abs_error_ms_p90": absolute[int(0.9 * (len(absolute) - 1))] if delays else None}


def human_clips():
    """(audio, transcript) of HUMAN_CLIPS that are installed."""
    import soundfile

    clips = []
    for name, text in HUMAN_CLIPS:
        path = os.path.join(HUMAN_DIR, name)
        if not os.path.exists(path):
            continue
        if path.endswith(".raw"):
            audio = np.fromfile(path, dtype="<i2").astype(np.float32) / 32768
        else:
            audio, rate = soundfile.read(path, dtype="float32")
            assert rate == corpus.SAMPLE_RATE
        clips.append((audio, text))
    return clips


def _prompt(word):
    """The recording of one word of a number ("seven", "forty", "hundred",
    "and", ...) at 16 kHz with its silences trimmed."""
    import soundfile
    import soxr

    names = {w: str(i) for i, w in enumerate(corpus._ONES)}
    names.update({w: str(10 * i) for i, w in enumerate(corpus._TENS) if i > 1})
    names.update({"hundred": "hundred", "thousand": "thousand", "oh": "oh"})
    path = (os.path.join(PROMPTS_DIR, "vm-and.wav") if word == "and" else
            os.path.join(PROMPTS_DIR, "digits", names[word] + ".wav"))
    audio, rate = soundfile.read(path, dtype="float32")
    audio = soxr.resample(audio, rate, corpus.SAMPLE_RATE).astype(np.float32)
    loud = np.flatnonzero(np.abs(audio) > 0.05 * np.abs(audio).max())
    return audio[max(0, loud[0] - 160):loud[-1] + 161]


def spoken_sets(per_set):
    """{name: [(audio, transcript)]}: digit strings and numbers said by a
    person, one recorded word after another with short pauses (50-250 ms);
    empty without asterisk-core-sounds-en-wav."""
    import random

    if not os.path.isdir(os.path.join(PROMPTS_DIR, "digits")):
        return {}
    rng = random.Random(SEED)
    makers = {"digit strings": corpus.text_of_kind("digits"),
              "numbers": corpus.text_of_kind("number")}
    sets = {}
    for name, make in makers.items():
        clips = []
        for _ in range(per_set):
            text = make(rng)
            parts = [np.zeros(int(rng.uniform(0.2, 0.6) * corpus.SAMPLE_RATE), np.float32)]
            for word in text.split():
                parts += [_prompt(word), np.zeros(int(rng.uniform(0.05, 0.25) * corpus.SAMPLE_RATE),
                                                  np.float32)]
            parts.append(np.zeros(int(0.8 * corpus.SAMPLE_RATE), np.float32))
            clips.append((np.concatenate(parts), text))
        sets[name] = clips
    return sets


def evaluate(model, work, per_set=60):
    from parakeet.engine.engine import Engine

    engine = Engine.load(model, device="cpu", num_slots=16, batch_size=16)
    sets = build_sets(work, per_set)
    report = {"sets": {}, "conditions": {}}
    heldout_rows, heldout_audio, heldout_decoded = [], [], []
    for name, rows in sets.items():
        audios = [_read(r) for r in rows]
        decoded = _decode(engine, audios)
        texts = [r["text"].replace(corpus.EOU, "") for r in rows]
        heldout = name.startswith("held out")
        report["sets"][name] = _score(engine, decoded, texts, audios if heldout else None)
        if heldout:
            heldout_rows += rows
            heldout_audio += audios
            heldout_decoded += decoded
    texts = [r["text"].replace(corpus.EOU, "") for r in heldout_rows]
    babble = [a[int(r["speech_start"] * 16000):int(r["speech_end"] * 16000)]
              for r, a in zip(heldout_rows[::-1], heldout_audio[::-1])][:8]
    rng = np.random.default_rng(SEED)
    for name, effect in CONDITIONS.items():
        audios = [effect(a, rng, babble) for a in heldout_audio]
        report["conditions"][name] = _score(engine, _decode(engine, audios), texts)
    report["end_of_utterance"] = end_of_utterance(engine, heldout_rows, heldout_decoded)
    sounds = no_speech(rng)
    heard = [engine.text_of(engine.decode_offline(audio)[0]).split() for _, audio in sounds]
    report["no_speech"] = {"clips": len(sounds), "words": sum(map(len, heard)),
                           "examples": [[name, " ".join(words)] for (name, _), words
                                        in zip(sounds, heard) if words]}
    human = human_clips()
    if human:
        report["human"] = _score(engine, _decode(engine, [a for a, _ in human]),
                                 [t for _, t in human])
    report["spoken"] = {name: _score(engine, _decode(engine, [a for a, _ in clips]),
                                     [t for _, t in clips])
                        for name, clips in spoken_sets(per_set).items()}
    return report


def print_report(report, out=None):
    out = out or sys.stdout

    def line(name, row):
        extra = ""
        if "streaming_identical" in row:
            extra = "  streaming = offline on %d" % row["streaming_identical"]
        out.write("%-34s %5d %6d  %6.3f%s\n" % (name, row["clips"], row["words"],
                                                 row["wer"], extra))

    out.write("%-34s %5s %6s  %6s\n" % ("set", "clips", "words", "WER"))
    for name, row in report["sets"].items():
        line(name, row)
    for name, row in report["conditions"].items():
        line("held out, " + name, row)
    if "human" in report:
        line("people (pocketsphinx-testdata)", report["human"])
    for name, row in report["spoken"].items():
        line("a person (asterisk): " + name, row)
    quiet = report["no_speech"]
    out.write("%-34s %5d %6s  %d words heard\n" % ("no speech (silence, noise)", quiet["clips"],
                                                  "", quiet["words"]))
    eou = report["end_of_utterance"]
    out.write("<EOU> on held-out voices: missing %d, extra %d of %d; median delay %s ms "
              "after speech, 90th percentile |error| %s ms\n" % (
                  eou["missing"], eou["extra"], eou["utterances"], eou["delay_ms_median"],
                  eou["abs_error_ms_p90"]))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--model", default=os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "..", "parakeet", "data", "demo.nemo"))
    parser.add_argument("--work", default=os.path.expanduser(
        "~/.cache/parakeet-server/demo-evaluation"), help="where the sets are synthesised")
    parser.add_argument("--per-set", type=int, default=60, help="clips per set")
    parser.add_argument("--json", help="also write the report here")
    args = parser.parse_args(argv)

    from parakeet.engine.nemo.loading import quiet_nemo

    quiet_nemo()
    report = evaluate(args.model, args.work, args.per_set)
    print_report(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
