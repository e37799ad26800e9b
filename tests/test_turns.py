"""
Turn detection on its own: a TurnTracker fed step results by hand.
"""

from twisted.trial import unittest

from parakeet.contract import StepResult
from parakeet.server.turns import END, PAUSE, RUNNING, START, TurnSettings, TurnTracker

EOU = 99
W = "\u2581"


def step(tokens=(), speech=(), endpoint=False, is_last=False):
    """A StepResult of (token, piece, frame) triples; confidence 0.5 each."""
    tokens = list(tokens)
    return (StepResult(1, [t for t, _, _ in tokens], [0.5] * len(tokens),
                       "".join(p.replace(W, " ") for _, p, _ in tokens if p != "<EOU>"),
                       is_last, [f for _, _, f in tokens], list(speech), endpoint),
            [p for _, p, _ in tokens])


class TrackerTests(unittest.TestCase):

    def tracker(self, vad=True, **settings):
        return TurnTracker(TurnSettings(**settings), 80, eou_id=EOU, vad=vad)

    def feed(self, tracker, audio_ms, always=False, **kwargs):
        result, pieces = step(**kwargs)
        return tracker.step(result, pieces, audio_ms, kwargs.get("is_last", False),
                            always=always)

    def test_utterance_from_first_word_to_eou(self):
        t = self.tracker()
        # Silence: one result saying so, then nothing new to say.
        (part,) = self.feed(t, 160, speech=[0.0] * 5)
        self.assertEqual(part.turn, {"turn_detection": PAUSE, "last_state": "silence"})
        self.assertEqual(self.feed(t, 320, speech=[0.1] * 5), [])
        # Speech starts: the state changes before any word.
        (part,) = self.feed(t, 480, speech=[0.9] * 5)
        self.assertEqual(part.turn, {"turn_detection": PAUSE, "last_state": "speech"})
        (part,) = self.feed(t, 640, tokens=[(1, W + "set", 6), (2, W + "an", 7)],
                            speech=[0.9] * 5)
        self.assertEqual((part.token_ids, part.text, part.turn["turn_detection"]),
                         ([1, 2], " set an", START))
        (part,) = self.feed(t, 800, tokens=[(3, W + "al", 8), (4, "arm", 9)], speech=[0.9] * 5)
        self.assertEqual(part.turn["turn_detection"], RUNNING)
        # <EOU> ends it; the token is in token_ids, never in the text.
        (part,) = self.feed(t, 960, tokens=[(EOU, "<EOU>", 10)], speech=[0.1] * 5)
        self.assertEqual((part.token_ids, part.text), ([EOU], ""))
        self.assertEqual(part.turn["turn_detection"], END)
        utterance = part.turn["utterance"]
        self.assertEqual(utterance, {
            "index": 0, "text": "set an alarm", "start_ms": 480, "end_ms": 800,
            "reason": "eou", "words": [
                {"word": "set", "start_ms": 480, "end_ms": 560, "confidence": 0.5},
                {"word": "an", "start_ms": 560, "end_ms": 640, "confidence": 0.5},
                {"word": "alarm", "start_ms": 640, "end_ms": 800, "confidence": 0.5}]})
        self.assertFalse(t.in_utterance)

    def test_always_a_part(self):
        """Asked for one every step, a step with no news still gives one part
        (and only one, when there is news)."""
        t = self.tracker()
        self.feed(t, 160, speech=[0.0] * 5)
        self.assertEqual(self.feed(t, 320, speech=[0.0] * 5), [])
        (part,) = self.feed(t, 480, always=True, speech=[0.0] * 5)
        self.assertEqual((part.token_ids, part.text), ([], ""))
        self.assertEqual(part.turn, {"turn_detection": PAUSE, "last_state": "silence"})
        self.feed(t, 640, tokens=[(1, W + "yes", 7)], speech=[0.9] * 5)
        (part,) = self.feed(t, 800, always=True, tokens=[(EOU, "<EOU>", 9)],
                            speech=[0.1] * 5)
        self.assertEqual(part.turn["turn_detection"], END)

    def test_language_tags(self):
        """A multilingual model's language tag is no word: the utterance
        says the language instead, from its tag on."""
        t = self.tracker()
        (part,) = self.feed(t, 320, tokens=[(1, W + "guten", 1), (2, W + "tag", 2),
                                            (3, "<de-DE>", 3)], speech=[0.9] * 5)
        self.assertEqual(part.text, " guten tag")
        self.assertEqual(t.language, "de-DE")
        (part,) = self.feed(t, 480, tokens=[(EOU, "<EOU>", 4)], speech=[0.1] * 5)
        utterance = part.turn["utterance"]
        self.assertEqual((utterance["text"], utterance["language"]), ("guten tag", "de-DE"))
        (part,) = self.feed(t, 640, tokens=[(4, W + "hello", 6), (5, "<en-US>", 7)],
                            is_last=True, speech=[0.9] * 5)
        self.assertEqual(part.turn["utterance"]["language"], "en-US")

    def test_eou_and_next_words_in_one_step_are_two_parts(self):
        t = self.tracker()
        self.feed(t, 160, tokens=[(1, W + "yes", 1)])
        parts = self.feed(t, 320, tokens=[(EOU, "<EOU>", 2), (2, W + "no", 3)])
        self.assertEqual([(p.token_ids, p.text, p.turn["turn_detection"]) for p in parts],
                         [([EOU], "", END), ([2], " no", START)])
        self.assertEqual(parts[0].turn["utterance"]["text"], "yes")
        self.assertEqual(t.utterances, 1)
        self.assertTrue(t.in_utterance)

    def test_eou_without_words_is_no_utterance(self):
        t = self.tracker()
        (part,) = self.feed(t, 160, tokens=[(EOU, "<EOU>", 1)])
        self.assertEqual(part.turn["turn_detection"], PAUSE)
        self.assertNotIn("utterance", part.turn)
        self.assertEqual(t.utterances, 0)

    def test_endpoint_ends_only_in_silence(self):
        t = self.tracker()
        self.feed(t, 160, tokens=[(1, W + "hi", 1)], speech=[0.9] * 5)
        # NeMo's endpointing while the detector still hears speech: going on.
        self.assertEqual(self.feed(t, 320, endpoint=True, speech=[0.9] * 5), [])
        # Silence (300 ms below the threshold) and the endpoint: the end.
        parts = self.feed(t, 800, endpoint=True, speech=[0.1] * 10)
        self.assertEqual(parts[-1].turn["turn_detection"], END)
        self.assertEqual(parts[-1].turn["last_state"], "silence")
        self.assertEqual(parts[-1].turn["utterance"]["reason"], "silence")

    def test_endpoint_without_a_detector(self):
        t = self.tracker(vad=False)
        self.feed(t, 160, tokens=[(1, W + "hi", 1)])
        (part,) = self.feed(t, 1200, endpoint=True)
        self.assertEqual((part.turn["turn_detection"], part.turn["last_state"]), (END, None))

    def test_hysteresis(self):
        t = self.tracker(min_silence_ms=96)
        self.feed(t, 160, speech=[0.9])
        # Between the thresholds: still speech; two windows below: still speech.
        self.feed(t, 320, speech=[0.4, 0.3, 0.2])
        self.assertEqual(t.last_state, "speech")
        self.feed(t, 480, speech=[0.2])
        self.assertEqual(t.last_state, "silence")
        self.feed(t, 640, speech=[0.5])
        self.assertEqual(t.last_state, "speech")

    def test_last_result_closes_the_utterance(self):
        t = self.tracker()
        self.feed(t, 160, tokens=[(1, W + "hi", 1)])
        (part,) = self.feed(t, 200, is_last=True)
        self.assertEqual(part.turn["utterance"]["reason"], "final")
        # A stream with no words still gets one last part.
        t = self.tracker()
        (part,) = self.feed(t, 200, is_last=True)
        self.assertEqual(part.turn["turn_detection"], PAUSE)

    def test_flush(self):
        t = self.tracker()
        self.feed(t, 160, tokens=[(1, W + "one", 1), (2, W + "two", 2)])
        turn = t.flush()
        self.assertEqual((turn["turn_detection"], turn["utterance"]["text"],
                          turn["utterance"]["reason"], turn["utterance"]["index"]),
                         (END, "one two", "flush", 0))
        # Nothing open: an empty utterance at the end of the audio so far.
        self.feed(t, 480)
        turn = t.flush()
        self.assertEqual(turn["utterance"], {"index": 1, "text": "", "start_ms": 480,
                                             "end_ms": 480, "words": [], "reason": "flush"})

    def test_finalize_after_silence(self):
        t = self.tracker(finalize_silence_ms=500)
        self.feed(t, 480, speech=[0.0] * 15)
        self.assertFalse(t.finalize_due)  # silence, but nobody spoke yet
        self.feed(t, 640, speech=[0.9] * 5)
        self.feed(t, 1280, speech=[0.0] * 15)
        self.assertFalse(t.finalize_due)
        self.feed(t, 1440, speech=[0.0] * 5)
        self.assertTrue(t.finalize_due)
        self.assertFalse(self.tracker().finalize_due)

    def test_silence_without_a_detector_is_time_without_tokens(self):
        t = self.tracker(vad=False, finalize_silence_ms=400)
        self.feed(t, 160, tokens=[(1, W + "hi", 1)])
        self.assertEqual(t.silence_ms, 0)
        self.feed(t, 560)
        self.assertEqual(t.silence_ms, 400)
        self.assertTrue(t.finalize_due)

    def test_pieces_must_match_tokens(self):
        t = self.tracker()
        result, _ = step(tokens=[(1, W + "hi", 1)])
        self.assertRaises(ValueError, t.step, result, [], 160)
