import numpy as np
from twisted.trial import unittest

from parakeet.audio import AudioError, Resampler, decode_samples, encode_samples


class CodecTests(unittest.TestCase):

    def test_pcm16_round_trip(self):
        samples = np.array([-1.0, -0.5, 0.0, 0.25, 32767 / 32768], dtype=np.float32)
        np.testing.assert_array_equal(decode_samples(encode_samples(samples), "pcm16"), samples)

    def test_pcm16_clips(self):
        decoded = decode_samples(encode_samples(np.array([2.0, -2.0])), "pcm16")
        np.testing.assert_array_equal(decoded, [32767 / 32768, -1.0])

    def test_f32_round_trip(self):
        samples = np.random.default_rng(0).uniform(-2, 2, 100).astype(np.float32)
        np.testing.assert_array_equal(decode_samples(encode_samples(samples, "f32"), "f32"), samples)

    def test_little_endian(self):
        self.assertEqual(encode_samples(np.array([1 / 32768]), "pcm16"), b"\x01\x00")
        self.assertEqual(decode_samples(b"\x00\x80", "pcm16")[0], -1.0)

    def test_errors(self):
        self.assertRaises(AudioError, decode_samples, b"\x00", "pcm16")
        self.assertRaises(AudioError, decode_samples, b"\x00" * 6, "f32")
        self.assertRaises(AudioError, decode_samples, b"", "opus")
        self.assertRaises(AudioError, encode_samples, [0.0], "opus")


class ResamplerTests(unittest.TestCase):

    def test_converts_rate_in_pieces(self):
        rate_in, rate_out = 8000, 16000
        t = np.arange(rate_in) / rate_in
        tone = np.sin(2 * np.pi * 440 * t).astype(np.float32)
        resample = Resampler(rate_in, rate_out)
        out = np.concatenate([resample(tone[i:i + 1000]) for i in range(0, len(tone), 1000)]
                             + [resample.flush()])
        self.assertEqual(len(out), 2 * len(tone))
        # Still a 440 Hz tone.
        spectrum = np.abs(np.fft.rfft(out))
        self.assertAlmostEqual(np.argmax(spectrum) * rate_out / len(out), 440, delta=2)


class _G711Tests:
    """An 8-bit G.711 encoding: ``encoding``, and audioop's decoder of it."""

    encoding = decoder = None

    def test_matches_the_standard_decoder(self):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            try:
                import audioop
            except ImportError:
                raise unittest.SkipTest("this Python has no audioop")
        codes = bytes(range(256))
        expected = np.frombuffer(getattr(audioop, self.decoder)(codes, 2), "<i2") / 32768.0
        np.testing.assert_array_equal(decode_samples(codes, self.encoding), expected)

    def test_round_trip_is_within_one_step(self):
        samples = np.linspace(-0.97, 0.97, 2001).astype(np.float32)
        decoded = decode_samples(encode_samples(samples, self.encoding), self.encoding)
        self.assertEqual(decoded.dtype, np.float32)
        # The steps grow with the level: 1/8192 (mu-law) or 1/2048 (A-law)
        # near zero, 1/32 at the top.
        error = np.abs(decoded - samples)
        self.assertLess(error.max(), 1 / 32)
        self.assertLess(error[np.abs(samples) < 0.01].max(), 1 / 1024)

    def test_every_byte_is_a_sample(self):
        self.assertEqual(len(decode_samples(b"\x00\xff\x7f", self.encoding)), 3)


class MulawTests(_G711Tests, unittest.TestCase):
    encoding, decoder = "mulaw", "ulaw2lin"


class ALawTests(_G711Tests, unittest.TestCase):
    """As telephone audio arrives through other APIs."""

    encoding, decoder = "alaw", "alaw2lin"

    def test_known_codes(self):
        # G.711's table: 0xD5 and 0x55 are the smallest levels, 0xAA and 0x2A the largest.
        self.assertEqual(list(decode_samples(b"\xd5\x55\xaa\x2a", "alaw") * 32768),
                         [8, -8, 32256, -32256])


class RateTests(unittest.TestCase):

    def test_check_rate(self):
        from parakeet.audio import check_rate

        for rate in (8000, 16000, 44100, 48000):
            self.assertEqual(check_rate(rate), rate)
        for bad in (7999, 48001, 0, -16000, 16000.0, "16000", True, None):
            with self.assertRaises(AudioError) as caught:
                check_rate(bad)
            self.assertIn("sample_rate must be a whole number of Hz from 8000 to 48000",
                          str(caught.exception))
