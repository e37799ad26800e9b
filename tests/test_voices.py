"""
parakeet.training.voices: every installed engine reads text aloud at 16 kHz, at the
rate asked; the held-out voices are never training voices.
"""

import random

import numpy as np
from twisted.trial import unittest

from parakeet.training import voices

TEXT = "set an alarm for seven thirty"


def pairs(pool):
    return {(engine, voice) for engine, names, _ in pool.rows for voice in names}


class EngineTests(unittest.TestCase):

    def check_engine(self, engine, voice):
        if not voices.available(engine):
            raise unittest.SkipTest("%s is not installed" % engine)
        slow = voices.speak(TEXT, voices.Speaker(engine, voice, stretch=1.3))
        fast = voices.speak(TEXT, voices.Speaker(engine, voice, stretch=0.8))
        self.assertEqual(slow.dtype, np.float32)
        # Speech of a sensible length, with the engine's silences trimmed.
        self.assertTrue(0.8 < len(fast) / voices.SAMPLE_RATE < 3.0, len(fast))
        # 1.3 against 0.8: longer, if not always in that ratio (the pauses
        # and the trimmed edges do not all stretch).
        self.assertGreater(len(slow), 1.15 * len(fast))
        self.assertGreater(float(np.abs(slow[:800]).max()), 0.01)

    def test_espeak(self):
        self.check_engine("espeak-ng", "en-us+m3")

    def test_flite(self):
        self.check_engine("flite", "slt")

    def test_festival(self):
        self.check_engine("festival", "kal")

    def test_piper(self):
        self.check_engine("piper", "joe")

    def test_kokoro(self):
        self.check_engine("kokoro", "en-us/jm_kumo")

    def test_kokoro_blend_and_accent(self):
        if not voices.available("kokoro"):
            raise unittest.SkipTest("kokoro is not installed")
        alpha = voices.speak(TEXT, voices.Speaker("kokoro", "en-gb/jf_alpha"))
        blend = voices.speak(TEXT, voices.Speaker("kokoro", "en-gb/jf_alpha+jm_kumo@0.40"))
        self.assertTrue(0.8 < len(blend) / voices.SAMPLE_RATE < 3.0, len(blend))
        # Another voice: not the same samples.
        n = min(len(alpha), len(blend))
        self.assertGreater(float(np.abs(alpha[:n] - blend[:n]).mean()), 0.01)

    def test_kokoro_reads_every_word_of_the_domain(self):
        """Every symbol espeak-ng spells the domain's words with, in either
        accent, is one Kokoro has: none is dropped on the way."""
        if not voices.available("kokoro"):
            raise unittest.SkipTest("kokoro is not installed")
        from parakeet.training import corpus

        _, vocab, _ = voices._kokoro_model()
        words = " ".join(sorted(corpus._vocabulary()))
        for accent in ("en-us", "en-gb"):
            spelled = voices.kokoro_phonemes(words, accent)
            self.assertEqual({c for c in spelled if c not in vocab}, set(), accent)


class PoolTests(unittest.TestCase):

    def test_heldout_voices_are_never_trained_on(self):
        trained = pairs(voices.TRAIN)
        for name, pool in voices.HELDOUT.items():
            self.assertFalse(pairs(pool) & trained, name)
        # At least two whole voices of engines other than espeak-ng.
        others = {p for pool in voices.HELDOUT.values() for p in pairs(pool)
                  if p[0] != "espeak-ng"}
        self.assertGreaterEqual(len({engine for engine, _ in others}), 2)

    def test_kokoro_blends_only_training_voices(self):
        rng = random.Random(11)
        drawn = [voices.random_speaker(rng, "kokoro", v).voice
                 for v in voices.KOKORO_TRAIN_VOICES + voices.KOKORO_HELDOUT_VOICES
                 for _ in range(50)]
        for voice in drawn:
            accent, style = voice.split("/")
            self.assertIn(accent, ("en-us", "en-gb"))
            names = [part.split("@")[0] for part in style.split("+")]
            self.assertTrue(set(names) <= set(voices.KOKORO_TRAIN_VOICES)
                            or names in ([v] for v in voices.KOKORO_HELDOUT_VOICES), voice)
        self.assertTrue(any("+" in voice for voice in drawn))

    def test_draw_is_reproducible_and_weighted(self):
        a = [voices.TRAIN.draw(random.Random(9)) for _ in range(3)]
        b = [voices.TRAIN.draw(random.Random(9)) for _ in range(3)]
        self.assertEqual(a, b)
        rng = random.Random(10)
        engines = [voices.TRAIN.draw(rng).engine for _ in range(2000)]
        for engine, _, weight in voices.TRAIN.rows:
            self.assertLess(abs(engines.count(engine) / 2000 - weight), 0.04)

    def test_installed_leaves_out_missing_engines(self):
        pool = voices.Pool([("espeak-ng", ("en-us",), 1), ("piper", ("joe",), 1)])
        self.assertEqual([row[0] for row in pool.installed().rows],
                         [e for e in ("espeak-ng", "piper") if voices.available(e)])
