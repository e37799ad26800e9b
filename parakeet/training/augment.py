"""
What the world does to speech between a mouth and a server, done to
synthetic speech so that a model trained on it hears people: a different
voice (speed, pitch, formants), a room (reverberation), noise, a
microphone (equaliser, gain, clipping) and a channel (band limits, a
telephone's 8 kHz and G.711 companding).

Pure numpy and scipy on float32 mono audio at 16 kHz, each effect a
function of (audio, rng, ...) with its parameters drawn from ``rng`` (a
``numpy.random.Generator``), so a corpus is reproducible from its seed.
``voice`` changes the speaker and returns speech of a new length; ``scene``
puts already padded speech into a room, a noise, a microphone and a channel
without changing its length, so that where speech starts and ends is
unchanged.
"""

import numpy as np

SAMPLE_RATE = 16000


def speed(audio, factor):
    """Played factor times as fast: tempo, pitch and formants together (the
    usual speed perturbation)."""
    import soxr

    return soxr.resample(audio, SAMPLE_RATE * factor, SAMPLE_RATE).astype(np.float32)


def _stft(audio, n_fft=512, hop=128):
    import scipy.signal

    return scipy.signal.stft(audio, nperseg=n_fft, noverlap=n_fft - hop,
                             nfft=n_fft, boundary="zeros", padded=True)[2]


def _istft(spectrum, length, n_fft=512, hop=128):
    import scipy.signal

    audio = scipy.signal.istft(spectrum, nperseg=n_fft, noverlap=n_fft - hop,
                               nfft=n_fft, boundary=True)[1]
    out = np.zeros(length, np.float32)
    out[:min(length, len(audio))] = audio[:length]
    return out


def _envelope(magnitude, lifter=30):
    """Spectral envelope of each frame by cepstral smoothing."""
    cepstrum = np.fft.irfft(np.log(magnitude + 1e-8), axis=0)
    cepstrum[lifter:-lifter] = 0
    return np.exp(np.fft.rfft(cepstrum, axis=0).real)


def formants(audio, factor):
    """Formants moved by factor (a longer or shorter vocal tract), pitch and
    timing kept: each frame's spectral envelope is stretched along the
    frequency axis over the same harmonics."""
    spectrum = _stft(audio)
    magnitude = np.abs(spectrum)
    envelope = _envelope(magnitude)
    bins = np.arange(magnitude.shape[0])
    warped = np.stack([np.interp(bins / factor, bins, column) for column in envelope.T], 1)
    return _istft(spectrum * (warped / (envelope + 1e-8)), len(audio))


def pitch(audio, semitones):
    """Pitch moved by semitones, timing and formants kept: played faster or
    slower by resampling, its duration restored by a phase vocoder, its
    envelope put back."""
    import librosa

    factor = 2 ** (semitones / 12)
    stretched = librosa.effects.time_stretch(audio, rate=1 / factor)
    shifted = speed(stretched, factor)[:len(audio)]
    shifted = np.pad(shifted, (0, len(audio) - len(shifted)))
    return formants(shifted, 1 / factor)


def voice(audio, rng):
    """A different speaker: (audio, names of the effects applied)."""
    applied = []
    if rng.random() < 0.5:
        factor = rng.uniform(0.85, 1.15)
        audio = speed(audio, factor)
        applied.append("speed %.2f" % factor)
    if rng.random() < 0.3:
        semitones = rng.uniform(-4, 4)
        audio = pitch(audio, semitones)
        applied.append("pitch %+.1f st" % semitones)
    if rng.random() < 0.3:
        factor = rng.uniform(0.85, 1.2)
        audio = formants(audio, factor)
        applied.append("formants %.2f" % factor)
    return audio.astype(np.float32), applied


def room_response(rng, rt60, length_s=None):
    """A synthetic room impulse response: the direct path, a few early
    reflections, and a diffuse tail of noise decaying by 60 dB in rt60
    seconds, darker as it decays (air and walls absorb highs first)."""
    import scipy.signal

    length = int(SAMPLE_RATE * (length_s or min(1.2, 1.5 * rt60)))
    t = np.arange(length) / SAMPLE_RATE
    decay = np.exp(-6.9 * t / rt60)
    tail = rng.standard_normal(length) * decay
    # Two bands: the upper one decays twice as fast.
    low_b, low_a = scipy.signal.butter(2, 2000, fs=SAMPLE_RATE)
    low = scipy.signal.lfilter(low_b, low_a, tail)
    tail = low + (tail - low) * np.exp(-6.9 * t / rt60)
    response = tail * rng.uniform(0.05, 0.4) / (np.abs(tail).max() + 1e-9)
    onset = int(SAMPLE_RATE * rng.uniform(0.002, 0.01))
    response[:onset] = 0
    response[0] = 1.0
    for _ in range(rng.integers(2, 6)):
        at = int(SAMPLE_RATE * rng.uniform(0.002, 0.04))
        response[at] += rng.uniform(-0.6, 0.6)
    return (response / np.sqrt(np.sum(response ** 2))).astype(np.float32)


def reverberate(audio, rng, rt60=None):
    import scipy.signal

    rt60 = rng.uniform(0.15, 0.9) if rt60 is None else rt60
    wet = scipy.signal.fftconvolve(audio, room_response(rng, rt60))[:len(audio)]
    return wet.astype(np.float32), "reverb rt60 %.2f s" % rt60


def _coloured(rng, length, exponent):
    """Noise with a power spectrum of 1/f**exponent (0 white, 1 pink, 2 brown)."""
    spectrum = np.fft.rfft(rng.standard_normal(length))
    f = np.maximum(np.fft.rfftfreq(length), 1.0 / length)
    return np.fft.irfft(spectrum / f ** (exponent / 2), n=length)


def _hum(rng, length):
    t = np.arange(length) / SAMPLE_RATE
    mains = rng.choice([50.0, 60.0])
    return sum(rng.uniform(0.2, 1.0) / k * np.sin(2 * np.pi * mains * k * t + rng.uniform(0, 6))
               for k in range(1, 8))


def noise(audio, rng, babble=(), snr=None, kind=None):
    """Noise of a random kind (white, pink, brown, hum, or babble when
    there is other speech to murmur from) at 0-30 dB SNR against the
    speech's power where it is loud; or of the kind and SNR given."""
    length = len(audio)
    if kind is None:
        kinds = ["white", "pink", "brown", "hum"] + (["babble"] if len(babble) >= 3 else [])
        kind = kinds[rng.integers(len(kinds))]
    if kind == "babble":
        picks = rng.choice(len(babble), size=min(len(babble), rng.integers(3, 7)),
                           replace=False)
        sound = np.zeros(length)
        for i in picks:
            other = np.resize(babble[i], length)
            sound += np.roll(other, rng.integers(length))
    elif kind == "hum":
        sound = _hum(rng, length)
    else:
        sound = _coloured(rng, length, {"white": 0, "pink": 1, "brown": 2}[kind])
    loud = audio[np.abs(audio) > 0.1 * (np.abs(audio).max() + 1e-9)]
    speech_power = np.mean(loud ** 2) if len(loud) else 1e-4
    snr = rng.triangular(0, 25, 30) if snr is None else snr
    sound *= np.sqrt(speech_power / (np.mean(sound ** 2) + 1e-12) / 10 ** (snr / 10))
    return (audio + sound).astype(np.float32), "%s noise %.0f dB" % (kind, snr)


def _biquad_peak(f0, gain_db, q):
    """RBJ peaking equaliser coefficients."""
    a = 10 ** (gain_db / 40)
    w = 2 * np.pi * f0 / SAMPLE_RATE
    alpha = np.sin(w) / (2 * q)
    b = [1 + alpha * a, -2 * np.cos(w), 1 - alpha * a]
    den = [1 + alpha / a, -2 * np.cos(w), 1 - alpha / a]
    return np.array(b) / den[0], np.array(den) / den[0]


def microphone(audio, rng):
    """A microphone's colour: a few peaks and dips, and a low cut."""
    import scipy.signal

    for _ in range(rng.integers(1, 4)):
        b, a = _biquad_peak(np.exp(rng.uniform(np.log(150), np.log(6000))),
                            rng.uniform(-8, 8), rng.uniform(0.5, 2.0))
        audio = scipy.signal.lfilter(b, a, audio)
    cut = rng.uniform(50, 250)
    b, a = scipy.signal.butter(1, cut, "highpass", fs=SAMPLE_RATE)
    return scipy.signal.lfilter(b, a, audio).astype(np.float32), "mic eq"


def band_limit(audio, rng):
    import scipy.signal

    top = rng.uniform(3000, 7000)
    b, a = scipy.signal.butter(6, top, fs=SAMPLE_RATE)
    return scipy.signal.lfilter(b, a, audio).astype(np.float32), "low-pass %.0f Hz" % top


def mu_law(audio, mu=255):
    """G.711 u-law: 8 bits a sample, there and back."""
    x = np.clip(audio, -1, 1)
    code = np.round(np.sign(x) * np.log1p(mu * np.abs(x)) / np.log1p(mu) * 127) / 127
    return (np.sign(code) * ((1 + mu) ** np.abs(code) - 1) / mu).astype(np.float32)


def a_law(audio, a=87.6):
    """G.711 A-law: 8 bits a sample, there and back."""
    x = np.clip(np.abs(audio), 0, 1)
    small = x < 1 / a
    y = np.where(small, a * x, 1 + np.log(np.maximum(a * x, 1e-12))) / (1 + np.log(a))
    y = np.round(y * 127) / 127
    big = y * (1 + np.log(a))
    x = np.where(y < 1 / (1 + np.log(a)), big / a, np.exp(big - 1) / a)
    return (np.sign(audio) * x).astype(np.float32)


def telephone(audio, rng=None, law="mu"):
    """A telephone call: 300-3400 Hz, 8 kHz, G.711, and back to 16 kHz."""
    import scipy.signal
    import soxr

    b, a = scipy.signal.butter(4, [300, 3400], "bandpass", fs=SAMPLE_RATE)
    narrow = soxr.resample(scipy.signal.lfilter(b, a, audio), SAMPLE_RATE, 8000)
    peak = np.abs(narrow).max() + 1e-9
    narrow = (mu_law if law == "mu" else a_law)(narrow * (0.7 / peak)) * (peak / 0.7)
    wide = soxr.resample(narrow, 8000, SAMPLE_RATE)
    out = np.zeros(len(audio), np.float32)
    out[:min(len(audio), len(wide))] = wide[:len(audio)]
    return out, "telephone %s-law" % law


def level(audio, rng):
    """A random level, sometimes driven into mild clipping."""
    peak = np.abs(audio).max() + 1e-9
    if rng.random() < 0.1:
        drive = rng.uniform(1.1, 1.8)
        return np.clip(audio * (drive / peak), -1, 1).astype(np.float32), "clipped x%.1f" % drive
    return (audio * (rng.uniform(0.05, 0.95) / peak)).astype(np.float32), None


def scene(audio, rng, babble=()):
    """audio in a room, a noise, a microphone and a channel, at a level:
    (audio of the same length, names of the effects applied)."""
    applied = []
    steps = ((0.35, reverberate), (0.6, lambda a, r: noise(a, r, babble)),
             (0.5, microphone), (0.15, band_limit))
    for chance, effect in steps:
        if rng.random() < chance:
            audio, name = effect(audio, rng)
            applied.append(name)
    if rng.random() < 0.15:
        audio, name = telephone(audio, rng, law=rng.choice(["mu", "a"]))
        applied.append(name)
    audio, name = level(audio, rng)
    if name:
        applied.append(name)
    return audio, applied
