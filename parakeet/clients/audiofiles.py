"""
Audio for the clients to send: a file read as mono samples
(:func:`read_audio_file`), or speech made on the spot
(:func:`synthesized_audio`), each an :class:`AudioSource` that resamples
itself to the rate a server asks for.
"""

import os
import shutil
import subprocess
import tempfile

#: What espeak-ng reads aloud when no --audio is given.
SPEECH_TEXT = (
    "Turn on the kitchen lights and set a timer for ten minutes. "
    "What is the weather going to be like tomorrow morning? "
    "Remind me to call the dentist on Thursday at half past three. "
    "Play some quiet music in the living room and close the blinds. "
    "How long does the train take from Paris to Berlin?")


class AudioSource:
    """Mono float32 samples at a known rate, and where they came from."""

    def __init__(self, samples, rate, description):
        self.samples = samples
        self.rate = rate
        self.description = description
        self._at = {rate: samples}

    @property
    def seconds(self):
        return len(self.samples) / self.rate

    def at_rate(self, rate):
        """The samples resampled to rate (soxr, high quality), computed once."""
        if rate not in self._at:
            import numpy as np
            import soxr

            self._at[rate] = np.asarray(
                soxr.resample(self.samples, self.rate, rate, quality="HQ"),
                dtype=np.float32)
        return self._at[rate]


def read_audio_file(path):
    """An audio file (WAV, FLAC, MP3, ...: what libsndfile reads) as an
    AudioSource; several channels are averaged."""
    import numpy as np

    # libsndfile says "System error." for a file that is missing, a folder
    # or unreadable; the OS says which, in words.
    with open(path, "rb"):
        pass
    try:
        import soundfile
    except ImportError:
        soundfile = None
    if soundfile is not None:
        data, rate = soundfile.read(path, dtype="float32", always_2d=True)
    else:
        import wave

        with wave.open(path) as wav:
            if wav.getsampwidth() != 2:
                raise ValueError("%s: only 16-bit WAV can be read without soundfile"
                                 % (path,))
            rate = wav.getframerate()
            frames = wav.readframes(wav.getnframes())
            data = (np.frombuffer(frames, "<i2").astype(np.float32) / 32768.0
                    ).reshape(-1, wav.getnchannels())
    if len(data) == 0:
        raise ValueError("%s holds no audio" % (path,))
    channels = data.shape[1]
    samples = np.ascontiguousarray(data.mean(axis=1) if channels > 1 else data[:, 0])
    description = "%s (%.1f s at %d Hz%s)" % (
        path, len(samples) / rate, rate,
        ", %d channels averaged to mono" % channels if channels > 1 else "")
    return AudioSource(samples.astype(np.float32), int(rate), description)


def synthesized_audio(text=SPEECH_TEXT):
    """Speech from espeak-ng when it is on PATH, else a synthetic stand-in
    for speech (:func:`calibration_audio`)."""
    espeak = shutil.which("espeak-ng")
    if espeak:
        with tempfile.TemporaryDirectory() as scratch:
            path = os.path.join(scratch, "speech.wav")
            try:
                subprocess.run([espeak, "-w", path, text], check=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               timeout=60)
                source = read_audio_file(path)
            except (OSError, subprocess.SubprocessError, ValueError):
                source = None
        if source is not None:
            source.description = "speech synthesized by espeak-ng (%.1f s at %d Hz)" % (
                source.seconds, source.rate)
            return source
    seconds = 10.0
    return AudioSource(calibration_audio(0, seconds), SAMPLE_RATE,
                       "synthetic tones in noise, calibration_audio "
                       "(%.1f s at %d Hz; espeak-ng is not installed)"
                       % (seconds, SAMPLE_RATE))


#: The rate of :func:`calibration_audio`.
SAMPLE_RATE = 16000


def calibration_audio(seed, seconds=3.0):
    """Gated, frequency-modulated tones in noise at SAMPLE_RATE: cheap
    stand-ins for speech."""
    import numpy as np

    rng = np.random.default_rng(seed)
    t = np.arange(int(SAMPLE_RATE * seconds)) / SAMPLE_RATE
    f0 = rng.uniform(100, 300)
    wobble = 200 * np.sin(2 * np.pi * rng.uniform(0.3, 2.0) * t)
    gate = np.sin(2 * np.pi * rng.uniform(0.5, 3.0) * t) > 0
    tone = 0.3 * np.sin(2 * np.pi * (f0 + wobble) * t) * gate
    return (tone + 0.05 * rng.standard_normal(len(t))).astype(np.float32)
