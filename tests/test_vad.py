"""
Voice activity detection: the batched, per-stream-state use of Silero VAD
against the package's own one-stream wrapper.
"""

import numpy as np
import torch
from twisted.trial import unittest

from parakeet.checkpoints import DEMO_SAMPLE
from parakeet.engine.vad import WINDOW, VoiceActivity


def speech_sample():
    import soundfile

    audio, rate = soundfile.read(DEMO_SAMPLE, dtype="float32")
    assert rate == 16000
    return audio


def reference_probabilities(audio):
    """Silero's own wrapper, one window at a time."""
    threads = torch.get_num_threads()
    try:
        import silero_vad

        model = silero_vad.load_silero_vad()
    finally:
        # Importing the package sets torch's thread count for the process.
        torch.set_num_threads(threads)
    with torch.inference_mode():
        return np.array([float(model(torch.from_numpy(audio[i:i + WINDOW]), 16000))
                         for i in range(0, len(audio) - WINDOW + 1, WINDOW)])


class VoiceActivityTests(unittest.TestCase):

    def test_matches_silero_and_streams_are_independent(self):
        audio = speech_sample()
        expected = reference_probabilities(audio)
        vad = VoiceActivity()
        other = np.random.default_rng(0).standard_normal(len(audio)).astype(np.float32) * 0.3
        got = {1: [], 2: []}
        # Uneven pieces, streams sharing some calls and not others.
        for n, start in enumerate(range(0, len(audio), 1237)):
            audio_in = {1: audio[start:start + 1237]}
            if n % 3:
                audio_in[2] = other[start:start + 1237]
            for sid, p in vad(audio_in).items():
                got[sid] += p
        self.assertEqual(len(got[1]), len(expected))
        np.testing.assert_allclose(got[1], expected, atol=1e-4)
        # The sample holds speech and silence.
        self.assertGreater(max(got[1]), 0.9)
        self.assertLess(min(got[1]), 0.1)

    def test_window_length_is_the_one_turns_count(self):
        from parakeet.server import turns
        from parakeet.engine import vad

        self.assertEqual(vad.WINDOW_MS, turns.WINDOW_MS)

    def test_partial_windows_wait(self):
        vad = VoiceActivity()
        self.assertEqual(vad({7: np.zeros(WINDOW - 1, np.float32)}), {7: []})
        self.assertEqual(len(vad({7: np.zeros(WINDOW + 1, np.float32)})[7]), 2)
        self.assertEqual(len(vad), 1)
        vad.forget([7])
        self.assertEqual(len(vad), 0)
