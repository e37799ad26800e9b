"""
parakeet.training.corpus: utterances read at once or read out a few words
at a time, with pauses between.
"""

import random

import numpy as np
from twisted.trial import unittest

from parakeet.training import corpus, voices

SPEAKER = voices.Speaker("espeak-ng", "en-us+m1")
DIGITS = "four five eight two nine one"


def pauses(audio, least_s=0.05):
    """The runs of digital silence at least least_s long."""
    silent = np.concatenate([[False], audio == 0, [False]])
    edges = np.flatnonzero(np.diff(silent.astype(np.int8)))
    runs = edges[1::2] - edges[::2]
    return [n for n in runs if n >= least_s * corpus.SAMPLE_RATE]


class DictatedTests(unittest.TestCase):

    def setUp(self):
        if not voices.available("espeak-ng"):
            raise unittest.SkipTest("espeak-ng is not installed")

    def test_groups_with_pauses(self):
        whole = voices.speak(DIGITS, SPEAKER)
        for seed in range(4):
            read_out = corpus.dictated(DIGITS, SPEAKER, random.Random(seed))
            # Each group said on its own, a pause of 50-500 ms after all but
            # the last: 1 to 5 pauses for 6 words, and longer than at once.
            gaps = pauses(read_out)
            self.assertTrue(1 <= len(gaps) <= 5, gaps)
            self.assertTrue(all(n <= 0.5 * corpus.SAMPLE_RATE for n in gaps), gaps)
            self.assertGreater(len(read_out), len(whole))
            self.assertEqual(len(pauses(whole)), 0)
        again = corpus.dictated(DIGITS, SPEAKER, random.Random(3))
        np.testing.assert_array_equal(again, read_out)

    def test_utterance_says_how_it_was_read(self):
        rng = random.Random(1)
        audio, start, end, effects = corpus.utterance(rng, DIGITS, SPEAKER, dictate=True)
        self.assertEqual(effects, ["dictated"])
        self.assertGreater(end - start, 0.5)
        for dictate in (None, False):
            # Plain utterances are read at once unless asked.
            self.assertEqual(corpus.utterance(rng, DIGITS, SPEAKER, dictate=dictate)[3], [])

    def test_numbers_are_read_out_more_often(self):
        # Augmented training utterances: numbers are read out a few words at
        # a time far more often than other text (DICTATED_SHARE).
        effects, rng = np.random.default_rng(0), random.Random(0)

        def read_out(text):
            return sum("dictated" in corpus.utterance(rng, text, SPEAKER, augmented=effects)[3]
                       for _ in range(30))

        numbers, commands = read_out("ninety two fifteen"), read_out("call mom")
        self.assertTrue(6 <= numbers <= 20, numbers)
        self.assertLessEqual(commands, 4)

    def test_write_set_records_it(self):
        work = self.mktemp()
        manifest = corpus.write_set(work, 2, voices.Pool([("espeak-ng", ("en-us+m1",), 1)]),
                                    seed=1, text=lambda r: DIGITS, dictate=True)
        rows = corpus.read_manifest(manifest)
        self.assertEqual([row["effects"] for row in rows], [["dictated"], ["dictated"]])
