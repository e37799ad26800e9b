"""
The built-in demo model (``--model demo``) on held-out voices: what it
recognises offline, streaming through the engine, and end to end over both
transports; where it marks the end of an utterance; and the training script
that made it, run for a few steps.

The held-out clips in tests/data/heldout were synthesised by
``parakeet.training.corpus.write_set`` with voice variants that never occur in the
demo model's training set (see tests/data/heldout/README).
"""

import importlib
import io
import json
import os
import shutil
import statistics
import sys
import tempfile

from twisted.internet import defer, reactor
from twisted.trial import unittest

from parakeet.checkpoints import (
    BUILTIN_MODELS, DEMO_SAMPLE, DEMO_SAMPLE_TEXT, resolve_model, served_name)
from parakeet.training import corpus, voices

from .support.models import (
    HELDOUT_ENGINES, OUT_OF_TEMPLATE, WER_BOUND, assert_engine_idle, decode_together, demo_engine, heldout_clips,
    offline_tokens, stream_alone, tokens_of)
from .support.servers import ServerTestMixin

TOOLS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools")

#: Bounds on word error rate over the 16 clips of voices of engines never
#: heard (flite rms, festival ked), over the 16 digit strings, numbers and
#: single words, and over the recordings of people; and on the words heard
#: in silence and noise.  Measured 0.345, 0.386, 0 and 0; the models
#: before: 0.230, 0.409, 0.143 and 0 (on the evaluation's 120 clips of the
#: same two voices both score 0.33); 0.414, 0.795, 0.286 and 0; 0.724, 1.023,
#: 1.0, and "switch on the fan" in silence.
ENGINE_WER_BOUND = 0.4
TEMPLATE_WER_BOUND = 0.45
PEOPLE_WER_BOUND = 0.15
#: Bound on word error rate over 16 digit strings and over 16 numbers read
#: by a person a word at a time.  Measured 0.62 and 0.36; the model before:
#: 0.71 and 0.81.
PERSON_WER_BOUND = 0.7
NO_SPEECH_WORDS = 1
#: Of the 11 digit strings and numbers out of template, those heard as
#: anything but number words.  Measured 1 ("four five eight two" as "what
#: time is it in"); the models before: 5 and 9.
NOT_A_NUMBER = 2
#: How many words more than said any of them is heard as.  Measured 2
#: ("repeat" as "wake me up"); the model before: 1.
MORE_WORDS = 2
#: Median distance between the end of speech and the frame where <EOU> is
#: emitted, in ms.  Measured 615 (the model before: 585).
EOU_BOUND_MS = 700


class DemoModelTests(unittest.TestCase):

    def setUp(self):
        self.engine = demo_engine()
        self.clips = heldout_clips()

    def tearDown(self):
        assert_engine_idle(self, self.engine)

    def test_builtin_name(self):
        self.assertEqual(resolve_model("demo"), BUILTIN_MODELS["demo"])
        self.assertTrue(os.path.isfile(BUILTIN_MODELS["demo"]))
        self.assertTrue(os.path.isfile(DEMO_SAMPLE))
        # Other names pass through untouched.
        self.assertEqual(resolve_model("nvidia/x"), "nvidia/x")
        # What a server serving each says in its hello.
        self.assertEqual(served_name(resolve_model("demo")), "demo")
        self.assertEqual(served_name("nvidia/x"), "nvidia/x")
        self.assertEqual(served_name("/models/mine.nemo"), "mine.nemo")

    def test_offline_accuracy(self):
        pairs = [(text, self.engine.text_of(offline_tokens(self.engine, audio)[0]))
                 for audio, text, _ in self.clips]
        wer = corpus.word_error_rate(pairs)
        self.assertLessEqual(wer, WER_BOUND, pairs)

    def test_streaming_matches_offline(self):
        # With real emissions (words, <EOU>), streaming through the engine in
        # 100 ms pieces gives exactly the offline tokens.
        emitted = 0
        for i, (audio, text, _) in enumerate(self.clips):
            expected, _ = offline_tokens(self.engine, audio)
            got = tokens_of(stream_alone(self.engine, audio, 1 + i, piece=1600))
            self.assertEqual(got, expected, text)
            emitted += len(got)
        self.assertGreater(emitted, 100)

    def test_batch_invariance(self):
        audios = [audio for audio, _, _ in self.clips[:8]]
        alone = [tokens_of(stream_alone(self.engine, a, 100 + i))
                 for i, a in enumerate(audios)]
        together, sizes = decode_together(self.engine, audios, [0, 0, 1, 2, 3, 5, 6, 8])
        self.assertGreaterEqual(max(sizes), 6)
        for i in range(8):
            self.assertEqual(together[i], alone[i], "clip %d" % i)

    def test_end_of_utterance(self):
        # Each clip is one utterance: <EOU> comes once, near where speech ends,
        # and is never part of the text.
        eou = self.engine.pipeline.asr_model.tokenizer.token_to_id(corpus.EOU)
        delays = []
        for audio, text, row in self.clips:
            tokens, frames, _ = self.engine.decode_offline(audio)
            self.assertEqual(tokens.count(eou), 1, text)
            heard_ms = (frames[tokens.index(eou)] + 2) * 80
            delays.append(heard_ms - 1000 * row["speech_end"])
            self.assertNotIn("EOU", self.engine.text_of(tokens))
        self.assertLessEqual(statistics.median(abs(d) for d in delays), EOU_BOUND_MS,
                             delays)


class UnheardVoicesTests(unittest.TestCase):
    """Voices of engines the demo model never heard, and text outside its
    templates: it says what it heard, not a sentence it knows."""

    def setUp(self):
        self.engine = demo_engine()

    def hear(self, clips):
        return [(text, self.engine.text_of(offline_tokens(self.engine, audio)[0]))
                for audio, text, _ in clips]

    def test_heldout_engines(self):
        pairs = self.hear(heldout_clips(HELDOUT_ENGINES))
        self.assertLessEqual(corpus.word_error_rate(pairs), ENGINE_WER_BOUND, pairs)

    def test_out_of_template(self):
        pairs = self.hear(heldout_clips(OUT_OF_TEMPLATE))
        self.assertLessEqual(corpus.word_error_rate(pairs), TEMPLATE_WER_BOUND, pairs)
        # A digit string or a number is heard as number words, not as a
        # sentence the model knows; nothing is heard as much longer than said.
        numeric = [(text, heard) for text, heard in pairs
                   if set(text.split()) <= corpus.NUMBER_WORDS]
        self.assertEqual(len(numeric), 11)
        not_numbers = [(text, heard) for text, heard in numeric
                       if not set(heard.split()) <= corpus.NUMBER_WORDS]
        self.assertLessEqual(len(not_numbers), NOT_A_NUMBER, not_numbers)
        for text, heard in pairs:
            self.assertLessEqual(len(heard.split()), len(text.split()) + MORE_WORDS, (text, heard))

    def test_no_words_in_silence_or_noise(self):
        # Silence and steady noise hold no words: a model that memorised its
        # sentences fills them with one.
        import numpy as np

        sounds = tool(self, "evaluate_demo_model", synthesis=False).no_speech(
            np.random.default_rng(1))
        heard = [(name, self.engine.text_of(offline_tokens(self.engine, audio)[0]).split())
                 for name, audio in sounds]
        self.assertLessEqual(sum(len(words) for _, words in heard), NO_SPEECH_WORDS, heard)

    def test_people(self):
        # Recordings of people saying the domain's words, where Debian's
        # pocketsphinx-testdata is installed (a smoke check: two clips).
        clips = tool(self, "evaluate_demo_model", synthesis=False).human_clips()
        if not clips:
            raise unittest.SkipTest("pocketsphinx-testdata is not installed")
        pairs = self.hear([(audio, text, None) for audio, text in clips])
        self.assertLessEqual(corpus.word_error_rate(pairs), PEOPLE_WER_BOUND, pairs)

    def test_a_person_reading_numbers(self):
        # Digit strings and numbers in a person's voice (her recordings of
        # each word, one after another), where Debian's
        # asterisk-core-sounds-en-wav is installed.
        sets = tool(self, "evaluate_demo_model", synthesis=False).spoken_sets(16)
        if not sets:
            raise unittest.SkipTest("asterisk-core-sounds-en-wav is not installed")
        for name, clips in sets.items():
            pairs = self.hear([(audio, text, None) for audio, text in clips])
            self.assertLessEqual(corpus.word_error_rate(pairs), PERSON_WER_BOUND, (name, pairs))


class _ReducedPrecision:
    """The demo model in a precision other than float32 recognises as
    float32 does: streaming equals offline on all but ``stream_differing``
    of the held-out clips, and the words are float32's on all but
    ``differing`` of them."""

    precision = None
    differing = 0
    stream_differing = 0

    def setUp(self):
        self.engine = demo_engine(self.precision)
        self.clips = heldout_clips()

    def tearDown(self):
        assert_engine_idle(self, self.engine)

    def test_streaming_matches_offline_and_float32(self):
        pairs = []
        unlike_offline = []
        for i, (audio, text, _) in enumerate(self.clips):
            expected, _ = offline_tokens(self.engine, audio)
            got = tokens_of(stream_alone(self.engine, audio, 1 + i, piece=1600))
            if got != expected:
                unlike_offline.append((text, self.engine.text_of(got),
                                       self.engine.text_of(expected)))
            pairs.append((text, self.engine.text_of(got)))
        self.assertLessEqual(len(unlike_offline), self.stream_differing, unlike_offline)
        self.assertLessEqual(corpus.word_error_rate(pairs), WER_BOUND, pairs)
        reference = demo_engine()
        same = sum(offline_tokens(reference, audio)[0] == offline_tokens(self.engine, audio)[0]
                   for audio, _, _ in self.clips)
        self.assertGreaterEqual(same, len(self.clips) - self.differing)


class BFloat16Tests(_ReducedPrecision, unittest.TestCase):
    """``--precision bfloat16`` on the CPU: the model really runs in bfloat16
    (NeMo's wrapper would run it in float32).  (13 of 16 clips measured
    equal to float32; streaming equal to offline on 15: on one, "the garden" is heard as "the bathroom" streaming
    and as "the living room" offline, bfloat16's rounding differing between
    a chunk's frames and the whole clip's.)"""

    precision = "bfloat16"
    differing = 3
    stream_differing = 1

    def test_runs_in_bfloat16(self):
        import torch

        pipeline = self.engine.pipeline
        self.assertEqual(self.engine.precision, "bfloat16")
        for module in (pipeline.asr_model.asr_model.encoder, pipeline.asr_model.asr_model.decoder,
                       pipeline.asr_model.asr_model.joint):
            self.assertEqual({p.dtype for p in module.parameters()}, {torch.bfloat16})
        self.assertEqual(pipeline.context_manager.cache_last_channel.dtype, torch.bfloat16)


class Int8Tests(_ReducedPrecision, unittest.TestCase):
    """``--precision int8``: eight-bit encoder products.  (13 of 16 clips
    measured equal to float32, with the same word error rate.)  Streaming
    and offline decoding differ in their float32 rounding (a product over a
    chunk's two frames against one over the whole clip), which quantizing
    can turn into a different level and a different word: 0 of 16 clips on
    an AVX2 processor, 2 on an AVX-512 one, with the same word error rate."""

    precision = "int8"
    differing = 4
    stream_differing = 3


class _EndToEnd(ServerTestMixin):
    """All held-out clips streamed at once over one transport."""

    @defer.inlineCallbacks
    def test_heldout_accuracy(self):
        self.start_server(engine=demo_engine())
        clips = heldout_clips()
        clients = yield defer.gatherResults([self.connect() for _ in clips])
        finals = yield defer.gatherResults([
            self.stream(client, audio) for client, (audio, _, _) in zip(clients, clips)])
        pairs = [(text, final["text"]) for (_, text, _), final in zip(clips, finals)]
        self.assertLessEqual(corpus.word_error_rate(pairs), WER_BOUND, pairs)


class TCPEndToEnd(_EndToEnd, unittest.TestCase):
    transport = "tcp"


class WebSocketEndToEnd(_EndToEnd, unittest.TestCase):
    transport = "ws"


class TranscribeCommandTests(ServerTestMixin, unittest.TestCase):
    """``parakeet-server transcribe`` on the bundled sample."""

    transport = "ws"

    @defer.inlineCallbacks
    def test_bundled_sample(self):
        from parakeet.clients.audiofiles import read_audio_file
        from parakeet.clients.transcribe import transcribe

        self.start_server(engine=demo_engine())
        out = io.StringIO()
        text = yield transcribe(reactor, self.address(), read_audio_file(DEMO_SAMPLE),
                                speed=20.0, out=out, partials=True)
        self.assertLessEqual(corpus.word_error_rate([(DEMO_SAMPLE_TEXT, text)]), WER_BOUND,
                             text)
        lines = out.getvalue().splitlines()
        self.assertEqual(lines[-1], text)
        partials = [line[4:] for line in lines[:-1]]
        self.assertTrue(partials and all(line.startswith("... ") for line in lines[:-1]))
        self.assertTrue(text.startswith(partials[-1]))


def tool(test, name, synthesis=True):
    """The script tools/NAME.py, imported; synthesis: skip test without
    espeak-ng, which the script needs."""
    if synthesis and not corpus.espeak_available():
        raise unittest.SkipTest("espeak-ng is not installed")
    sys.path.insert(0, TOOLS)
    test.addCleanup(sys.path.remove, TOOLS)
    return importlib.import_module(name)


def scratch(test):
    """A folder that is removed after test."""
    work = tempfile.mkdtemp()
    test.addCleanup(shutil.rmtree, work)
    return work


class EvaluationCommandTests(unittest.TestCase):
    """tools/evaluate_demo_model.py on two clips a set."""

    def test_report(self):
        evaluate_demo_model = tool(self, "evaluate_demo_model")
        work = scratch(self)
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        evaluate_demo_model.main(["--work", work, "--per-set", "2", "--json",
                                  os.path.join(work, "report.json")])
        with open(os.path.join(work, "report.json")) as f:
            report = json.load(f)
        names = set(report["sets"])
        installed = [name for name, pool in voices.HELDOUT.items() if pool.installed().rows]
        self.assertTrue({"held out: " + name for name in installed} <= names, names)
        self.assertIn("out of template: digits", names)
        self.assertIn("out of template: digits read out", names)
        for row in report["sets"].values():
            self.assertEqual(row["clips"], 2)
            self.assertTrue(0 <= row["wer"] <= 3)
        self.assertEqual(set(report["conditions"]), set(evaluate_demo_model.CONDITIONS))
        self.assertEqual(report["end_of_utterance"]["utterances"], 2 * len(installed))
        self.assertEqual(report["no_speech"]["clips"], 5)
        # The table: a line per set and condition.
        text = out.getvalue()
        for name in list(report["sets"]) + list(report["conditions"]) + ["no speech"]:
            self.assertIn(name, text)
        if os.path.isdir(evaluate_demo_model.PROMPTS_DIR):
            self.assertEqual(set(report["spoken"]), {"digit strings", "numbers"})
            for name, row in report["spoken"].items():
                self.assertEqual(row["clips"], 2)
                self.assertIn("a person (asterisk): " + name, text)
        self.assertIn("<EOU> on held-out voices", text)


class TrainingScriptTests(unittest.TestCase):
    """tools/train_demo_model.py, end to end on a handful of utterances."""

    def test_a_few_steps(self):
        train_demo_model = tool(self, "train_demo_model")
        work = scratch(self)
        out = os.path.join(work, "demo.nemo")
        train_demo_model.main(["--work", work, "--out", out, "--utterances", "8",
                               "--heldout", "4", "--steps", "2", "--batch-size", "4",
                               "--processes", "1"])
        train = corpus.read_manifest(os.path.join(work, "train.json"))
        self.assertEqual(len(train), 8)
        self.assertTrue(all(r["text"].endswith(corpus.EOU) for r in train))
        heard = {(engine, voice) for engine, names, _ in voices.TRAIN.rows for voice in names}

        def sources(row):
            speaker = voices.Speaker(**row["tts"])
            return {(speaker.engine, voice) for voice in speaker.sources}

        self.assertTrue(all(sources(r) <= heard for r in train))
        # Each held-out pool whose engine is installed gives --heldout clips,
        # none of them read by a training voice.
        pools = [p for p in voices.HELDOUT.values() if p.installed().rows]
        rows = corpus.read_manifest(os.path.join(work, "heldout.json"))
        self.assertEqual(len(rows), 4 * len(pools))
        self.assertTrue(all(r["text"].endswith(corpus.EOU) for r in rows))
        self.assertFalse(set().union(*map(sources, rows)) & heard)
        # The result loads the way the server loads any model.
        from parakeet.engine.engine import Engine

        engine = Engine.load(out, device="cpu", num_slots=2, batch_size=2)
        self.assertEqual(engine.geometry.chunk_frames, 16)
        self.assertIn(corpus.EOU, engine.pipeline.asr_model.tokenizer.vocab)
