"""
Audio for the clients (:mod:`parakeet.clients.audiofiles`): a WAV file read
as mono and resampled, and speech synthesized with espeak-ng or without.
"""


import numpy as np
from twisted.trial import unittest

from parakeet.clients import audiofiles

from .support.models import speechlike, write_wav


class AudioSourceTests(unittest.TestCase):

    def test_wav_file_to_mono_and_resampled(self):
        path = write_wav(self.mktemp() + ".wav", speechlike(4, 1.0), 22050, channels=2)
        source = audiofiles.read_audio_file(path)
        self.assertEqual((source.rate, len(source.samples)), (22050, 16000))
        self.assertIn("2 channels averaged", source.description)
        self.assertEqual(len(source.at_rate(16000)), round(16000 * 16000 / 22050))
        self.assertIs(source.at_rate(16000), source.at_rate(16000))

    def test_without_espeak(self):
        self.patch(audiofiles.shutil, "which", lambda name: None)
        source = audiofiles.synthesized_audio()
        self.assertEqual(source.rate, 16000)
        self.assertIn("calibration_audio", source.description)
        self.assertGreater(source.seconds, 1.0)

    def test_with_espeak(self):
        if not audiofiles.shutil.which("espeak-ng"):
            raise unittest.SkipTest("espeak-ng is not installed")
        source = audiofiles.synthesized_audio("Hello there.")
        self.assertIn("espeak-ng", source.description)
        self.assertGreater(np.abs(source.samples).max(), 0.05)
