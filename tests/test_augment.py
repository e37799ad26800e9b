"""
parakeet.training.augment: each effect does what it says to a signal whose answer
is known (a harmonic tone, an impulse, noise).
"""

import numpy as np
from twisted.trial import unittest

from parakeet.training import augment

RATE = augment.SAMPLE_RATE


def harmonic(f0=150.0, seconds=1.0, harmonics=20):
    """A voiced-like tone: f0 and its harmonics, falling 6 dB an octave."""
    t = np.arange(int(RATE * seconds)) / RATE
    tone = sum(np.sin(2 * np.pi * f0 * k * t) / k for k in range(1, harmonics + 1)
               if f0 * k < RATE / 2)
    return (0.3 * tone / np.abs(tone).max()).astype(np.float32)


def fundamental(audio):
    """f0 by autocorrelation, 60-400 Hz."""
    x = audio - audio.mean()
    corr = np.correlate(x[:8000], x[:8000], "full")[7999:]
    lo, hi = RATE // 400, RATE // 60
    return RATE / (lo + np.argmax(corr[lo:hi]))


def formant(audio):
    """Where the energy between 400 and 2500 Hz lies (its centroid)."""
    power = np.abs(np.fft.rfft(audio)) ** 2
    freqs = np.fft.rfftfreq(len(audio), 1 / RATE)
    band = (freqs > 400) & (freqs < 2500)
    return float((power[band] * freqs[band]).sum() / power[band].sum())


def band_energy(audio, low, high):
    spectrum = np.abs(np.fft.rfft(audio)) ** 2
    freqs = np.fft.rfftfreq(len(audio), 1 / RATE)
    return float(spectrum[(freqs >= low) & (freqs < high)].sum() / spectrum.sum())


class VoiceTests(unittest.TestCase):

    def test_speed(self):
        tone = harmonic()
        faster = augment.speed(tone, 1.25)
        self.assertAlmostEqual(len(faster) / len(tone), 0.8, places=2)
        self.assertLess(abs(fundamental(faster) / fundamental(tone) - 1.25), 0.03)

    def test_pitch_keeps_timing(self):
        tone = harmonic()
        higher = augment.pitch(tone, 3.0)
        self.assertEqual(len(higher), len(tone))
        self.assertLess(abs(fundamental(higher) / fundamental(tone) - 2 ** 0.25), 0.04)

    def test_formants_keep_pitch(self):
        import scipy.signal

        # A vowel-like tone: harmonics of 150 Hz through a resonance at 1 kHz.
        b, a = augment._biquad_peak(1000, 24, 4)
        vowel = scipy.signal.lfilter(b, a, harmonic()).astype(np.float32)
        before = formant(vowel)
        self.assertLess(abs(before - 1000), 50)
        higher = augment.formants(vowel, 1.2)
        self.assertEqual(len(higher), len(vowel))
        self.assertLess(abs(fundamental(higher) - fundamental(vowel)), 3)
        self.assertGreater(formant(higher), 1.1 * before)
        self.assertLess(formant(augment.formants(vowel, 0.85)), 0.9 * before)

    def test_voice_is_reproducible(self):
        tone = harmonic()
        a, names_a = augment.voice(tone, np.random.default_rng(5))
        b, names_b = augment.voice(tone, np.random.default_rng(5))
        self.assertEqual(names_a, names_b)
        np.testing.assert_array_equal(a, b)


class SceneTests(unittest.TestCase):

    def test_noise_at_the_snr_asked(self):
        tone = harmonic()
        for kind in ("white", "pink", "brown", "hum"):
            noisy, name = augment.noise(tone, np.random.default_rng(1), snr=10, kind=kind)
            added = noisy - tone
            snr = 10 * np.log10(np.mean(tone ** 2) / np.mean(added ** 2))
            self.assertLess(abs(snr - 10), 1.0, kind)
            self.assertIn(kind, name)

    def test_babble_needs_speech(self):
        rng = np.random.default_rng(2)
        kinds = {augment.noise(harmonic(), rng)[1].split()[0] for _ in range(40)}
        self.assertNotIn("babble", kinds)
        others = [harmonic(f0) for f0 in (110, 130, 170, 210)]
        kinds = {augment.noise(harmonic(), rng, babble=others)[1].split()[0] for _ in range(40)}
        self.assertIn("babble", kinds)

    def test_room_response(self):
        response = augment.room_response(np.random.default_rng(3), rt60=0.5)
        self.assertAlmostEqual(float(np.sum(response ** 2)), 1.0, places=4)
        self.assertEqual(int(np.argmax(np.abs(response))), 0)
        early = np.sum(response[800:2400] ** 2)
        late = np.sum(response[5600:7200] ** 2)
        # 60 dB in 0.5 s: the 0.35-0.45 s window is ~36 dB below 0.05-0.15 s.
        self.assertLess(late, early * 10 ** -2.5)

    def test_reverberation_keeps_length(self):
        tone = harmonic()
        wet, name = augment.reverberate(tone, np.random.default_rng(4), rt60=0.6)
        self.assertEqual(len(wet), len(tone))
        self.assertEqual(name, "reverb rt60 0.60 s")

    def test_telephone(self):
        noise = np.random.default_rng(5).standard_normal(RATE).astype(np.float32) * 0.1
        for law in ("mu", "a"):
            call, _ = augment.telephone(noise, law=law)
            self.assertEqual(len(call), len(noise))
            self.assertLess(band_energy(call, 4000, 8000), 0.01)
            self.assertLess(band_energy(call, 0, 200), 0.02)

    def test_companding_is_eight_bits(self):
        ramp = np.linspace(-1, 1, 100001, dtype=np.float32)
        for law in (augment.mu_law, augment.a_law):
            out = law(ramp)
            self.assertLessEqual(len(np.unique(out)), 256)
            self.assertLess(np.max(np.abs(out - ramp)), 0.04)
            # Fine steps near zero, coarse near full scale.
            quiet = np.abs(ramp) < 0.01
            self.assertLess(np.max(np.abs(out - ramp)[quiet]), 0.002)

    def test_band_limit(self):
        noise = np.random.default_rng(6).standard_normal(RATE).astype(np.float32) * 0.1
        low, name = augment.band_limit(noise, np.random.default_rng(7))
        top = float(name.split()[1])
        self.assertLess(band_energy(low, top * 1.5, 8000), 0.01)

    def test_scene_keeps_length_and_range(self):
        tone = harmonic(seconds=2.0)
        rng = np.random.default_rng(8)
        seen = set()
        for _ in range(30):
            out, names = augment.scene(tone, rng)
            self.assertEqual(len(out), len(tone))
            self.assertEqual(out.dtype, np.float32)
            self.assertLessEqual(float(np.abs(out).max()), 1.0)
            seen.update(name.split()[0] for name in names)
        self.assertTrue({"reverb", "mic", "telephone", "clipped"} <= seen, seen)
