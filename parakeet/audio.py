"""
Audio payloads: bytes on the wire to float32 samples, and rate conversion.
"""

import numpy as np

ENCODINGS = ("pcm16", "f32", "mulaw", "alaw")

#: Client sample rates the server converts from, in Hz.
MIN_RATE, MAX_RATE = 8000, 48000

#: The largest f32 sample magnitude accepted: [-1, 1] with 6 dB to spare.
F32_LIMIT = 2.0


class AudioError(ValueError):
    """The audio payload or its rate is malformed; the message says how, and
    kind is what it is about (``bad_audio`` or ``bad_sample_rate``)."""

    def __init__(self, message, kind="bad_audio"):
        ValueError.__init__(self, message)
        self.kind = kind


def _mulaw_table():
    """The 256 G.711 mu-law codes as float32 samples in [-1, 1]."""
    codes = ~np.arange(256, dtype=np.uint8)
    sign = (codes & 0x80) != 0
    exponent = (codes >> 4) & 0x07
    mantissa = codes & 0x0F
    magnitude = (((mantissa.astype(np.int32) << 3) + 0x84) << exponent) - 0x84
    return (np.where(sign, -magnitude, magnitude) / 32768.0).astype(np.float32)


def _alaw_table():
    """The 256 G.711 A-law codes as float32 samples in [-1, 1]."""
    codes = np.arange(256, dtype=np.int32) ^ 0x55
    exponent = (codes >> 4) & 0x07
    mantissa = (codes & 0x0F) << 4
    magnitude = np.where(exponent == 0, mantissa + 8,
                         (mantissa + 0x108) << np.maximum(exponent - 1, 0))
    return (np.where(codes & 0x80, magnitude, -magnitude) / 32768.0).astype(np.float32)


_MULAW = _mulaw_table()
_ALAW = _alaw_table()
#: Each 8-bit G.711 encoding's table of samples.
_G711 = {"mulaw": _MULAW, "alaw": _ALAW}


def check_rate(rate):
    """rate if it is a sample rate the server converts from, else AudioError."""
    if isinstance(rate, bool) or not isinstance(rate, int) or not MIN_RATE <= rate <= MAX_RATE:
        raise AudioError("sample_rate must be a whole number of Hz from %d to %d, got %s"
                         % (MIN_RATE, MAX_RATE, str(rate)[:32]), "bad_sample_rate")
    return rate


def decode_samples(payload, encoding):
    """Little-endian pcm16, f32 or 8-bit G.711 (mu-law or A-law) bytes to
    float32 samples in [-1, 1]."""
    if encoding == "pcm16":
        if len(payload) % 2:
            raise AudioError("pcm16 audio must have an even number of bytes, got %d"
                             % len(payload))
        return np.frombuffer(payload, dtype="<i2").astype(np.float32) / 32768.0
    if encoding == "f32":
        if len(payload) % 4:
            raise AudioError("f32 audio must be a multiple of 4 bytes long, got %d"
                             % len(payload))
        samples = np.frombuffer(payload, dtype="<f4").astype(np.float32)
        if not np.isfinite(samples).all():
            raise AudioError("f32 audio contains NaN or infinite samples")
        peak = float(np.abs(samples).max()) if len(samples) else 0.0
        if peak > F32_LIMIT:
            # Far outside [-1, 1] is a client bug (often pcm16 values sent as
            # f32), and large enough values overflow the model's features.
            raise AudioError("f32 audio must lie in [-1, 1]: got a sample of magnitude "
                             "%.3g" % (peak,))
        return samples
    if encoding in _G711:
        return _G711[encoding][np.frombuffer(payload, dtype=np.uint8)]
    raise AudioError("unknown audio encoding %r (expected one of: %s)"
                     % (encoding, ", ".join(ENCODINGS)))


def encode_samples(samples, encoding="pcm16"):
    """float32 samples to the little-endian bytes of encoding (the inverse of decode_samples)."""
    samples = np.asarray(samples, dtype=np.float32)
    if encoding == "pcm16":
        return (np.clip(samples, -1.0, 32767 / 32768) * 32768).round().astype("<i2").tobytes()
    if encoding == "f32":
        return samples.astype("<f4").tobytes()
    if encoding in _G711:
        # The nearest code.
        table = _G711[encoding]
        order = np.argsort(table)
        index = np.clip(np.searchsorted(table[order], samples), 1, 255)
        lower, upper = table[order][index - 1], table[order][index]
        index = np.where(samples - lower < upper - samples, index - 1, index)
        return order[index].astype(np.uint8).tobytes()
    raise AudioError("unknown audio encoding %r" % (encoding,))


class Resampler:
    """Streaming conversion from a client's sample rate to the model's."""

    def __init__(self, in_rate, out_rate):
        import soxr

        self._stream = soxr.ResampleStream(in_rate, out_rate, 1, dtype="float32",
                                           quality="HQ")

    def __call__(self, samples):
        return self._stream.resample_chunk(samples)

    def flush(self):
        """The samples still held back, once the input has ended."""
        return self._stream.resample_chunk(np.zeros(0, dtype=np.float32), last=True)
