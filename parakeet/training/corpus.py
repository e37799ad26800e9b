"""
The demo model's domain: sentences a voice assistant hears (digits,
numbers, times and commands) and text that breaks their templates, and
sets of them read aloud (``parakeet.training.voices``) with silences around them,
plain or through ``parakeet.training.augment``'s rooms, noises and channels.

Used by ``tools/train_demo_model.py`` to build its corpus and by the tests
to check what the demo model recognises.
"""

import json
import os
import random

import attr

from parakeet.training import augment, voices

SAMPLE_RATE = 16000

#: The end-of-utterance token every training transcript ends with.
EOU = "<EOU>"

_ONES = ("zero one two three four five six seven eight nine ten eleven twelve "
         "thirteen fourteen fifteen sixteen seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_words(n):
    """English words for 0 <= n < 1,000,000, e.g. 'three hundred and five'."""
    if n < 20:
        return _ONES[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return _TENS[tens] + ("" if ones == 0 else " " + _ONES[ones])
    if n < 1000:
        hundreds, rest = divmod(n, 100)
        head = _ONES[hundreds] + " hundred"
        return head if rest == 0 else head + " and " + number_words(rest)
    thousands, rest = divmod(n, 1000)
    head = number_words(thousands) + " thousand"
    if rest == 0:
        return head
    return head + (" and " if rest < 100 else " ") + number_words(rest)


_ROOMS = ["kitchen", "living room", "bedroom", "bathroom", "office", "garage",
          "hallway", "basement", "garden", "dining room"]
_DEVICES = ["lights", "lamp", "fan", "heater", "radio", "television", "oven",
            "kettle", "coffee machine", "air conditioner", "music", "alarm"]
_PEOPLE = ["mom", "dad", "anna", "peter", "grandma", "the doctor", "my sister",
           "my brother", "the office", "david", "maria", "john"]
_GENRES = ["jazz", "rock", "classical music", "the news", "some music",
           "my playlist", "the radio", "a podcast", "relaxing music", "pop"]
_ITEMS = ["milk", "bread", "eggs", "coffee", "apples", "rice", "butter",
          "cheese", "tea", "oranges", "batteries", "flowers"]
_DAYS = ["today", "tomorrow", "on monday", "on tuesday", "on wednesday",
         "on thursday", "on friday", "on saturday", "on sunday", "tonight",
         "this weekend", "next week"]
_CITIES = ["london", "paris", "berlin", "tokyo", "new york", "chicago",
           "madrid", "boston", "sydney", "rome"]
_UNITS = ["seconds", "minutes", "hours"]


def time_words(rng):
    hour = rng.randint(1, 12)
    minute = rng.choice([0, 5, 10, 15, 20, 25, 30, 40, 45, 50, rng.randint(1, 59)])
    style = rng.random()
    if minute == 30 and style < 0.3:
        text = "half past " + number_words(hour)
    elif minute == 15 and style < 0.3:
        text = "quarter past " + number_words(hour)
    elif minute == 0:
        text = number_words(hour) + rng.choice([" o'clock", ""])
    elif minute < 10:
        text = number_words(hour) + " oh " + number_words(minute)
    else:
        text = number_words(hour) + " " + number_words(minute)
    return text + rng.choice(["", "", " am", " pm", " in the morning",
                              " in the evening"])


def _digits(rng, count):
    return " ".join(_ONES[rng.randint(0, 9)] for _ in range(count))


def _number(rng):
    return number_words(rng.choice([rng.randint(0, 20), rng.randint(20, 100),
                                    rng.randint(100, 1000), rng.randint(1000, 100000)]))


_TEMPLATES = [
    lambda r: "turn %s the %s %s" % (r.choice(["on", "off"]), r.choice(_ROOMS), r.choice(_DEVICES)),
    lambda r: "turn %s the %s" % (r.choice(["on", "off"]), r.choice(_DEVICES)),
    lambda r: "switch %s the %s in the %s" % (r.choice(["on", "off"]), r.choice(_DEVICES), r.choice(_ROOMS)),
    lambda r: "set the %s to %s percent" % (r.choice(_DEVICES), number_words(r.randint(0, 100))),
    lambda r: "set the temperature to %s degrees" % number_words(r.randint(10, 30)),
    lambda r: "set a timer for %s %s" % (number_words(r.randint(1, 90)), r.choice(_UNITS)),
    lambda r: "set an alarm for %s" % time_words(r),
    lambda r: "wake me up at %s %s" % (time_words(r), r.choice(_DAYS)),
    lambda r: "remind me to buy %s at %s" % (r.choice(_ITEMS), time_words(r)),
    lambda r: "add %s and %s to my shopping list" % (r.choice(_ITEMS), r.choice(_ITEMS)),
    lambda r: "call %s" % r.choice(_PEOPLE),
    lambda r: "send a message to %s" % r.choice(_PEOPLE),
    lambda r: "dial %s" % _digits(r, r.randint(3, 10)),
    lambda r: "my pin is %s" % _digits(r, 4),
    lambda r: "the code is %s" % _digits(r, r.randint(4, 6)),
    lambda r: _digits(r, r.randint(2, 8)),
    lambda r: _number(r),
    lambda r: "play %s %s" % (r.choice(_GENRES), r.choice(["", "in the " + r.choice(_ROOMS)])),
    lambda r: "what is the weather %s" % r.choice(_DAYS),
    lambda r: "what is the weather in %s %s" % (r.choice(_CITIES), r.choice(_DAYS)),
    lambda r: "what time is it in %s" % r.choice(_CITIES),
    lambda r: "what time is it",
    lambda r: "book a table for %s at %s" % (number_words(r.randint(1, 12)), time_words(r)),
    lambda r: "schedule a meeting with %s %s at %s" % (r.choice(_PEOPLE), r.choice(_DAYS), time_words(r)),
    lambda r: "how long does it take to get to %s" % r.choice(_CITIES),
    lambda r: "%s the volume" % r.choice(["turn up", "turn down", "mute", "lower", "raise"]),
    lambda r: "%s" % r.choice(["stop", "pause", "next song", "go back", "cancel",
                               "yes please", "no thank you", "repeat that",
                               "good morning", "good night", "thank you"]),
    lambda r: "open the %s door" % r.choice(["front", "back", "garage", "kitchen"]),
    lambda r: "lock the %s door" % r.choice(["front", "back", "garage", "kitchen"]),
    lambda r: "how much is %s plus %s" % (_number(r), _number(r)),
    lambda r: "convert %s %s to %s" % (number_words(r.randint(1, 500)),
                                       r.choice(["miles", "pounds", "dollars", "euros"]),
                                       r.choice(["kilometres", "kilograms", "euros", "dollars"])),
]


def sentence(rng):
    """One sentence of the domain: lower case, words separated by single spaces."""
    return " ".join(rng.choice(_TEMPLATES)(rng).split())


def _vocabulary():
    """Every word the templates can say, in a fixed order."""
    rng = random.Random(0)
    words = set(_ONES + _TENS[2:] + ["hundred", "thousand", "and", "oh"])
    for _ in range(20000):
        words.update(sentence(rng).split())
    return sorted(words)


#: The domain's words.
VOCABULARY = _vocabulary()


def digit_string(rng):
    """1 to 12 digits, zero said as "zero" or, as people often do, "oh"."""
    zero = rng.choice(["zero", "zero", "oh"])
    return " ".join(zero if d == 0 else _ONES[d]
                    for d in (rng.randint(0, 9) for _ in range(rng.randint(1, 12))))


def _words(rng):
    return " ".join(rng.choice(VOCABULARY) for _ in range(rng.randint(2, 8)))


def _cut_short(rng):
    words = sentence(rng).split()
    return " ".join(words[:rng.randint(1, max(1, len(words) - 1))])


#: Kinds of text, with their share of a training corpus: the templates'
#: sentences, and text that breaks them, so that a model says what it heard
#: rather than the nearest sentence it knows.
TEXT_KINDS = (
    ("sentence", 0.45, sentence),
    ("words", 0.15, _words),
    ("digits", 0.15, digit_string),
    ("number", 0.10, _number),
    ("word", 0.07, lambda r: r.choice(VOCABULARY)),
    ("cut", 0.08, _cut_short),
)


def mixed_text(rng):
    """Text of a kind drawn with TEXT_KINDS' shares."""
    _, _, make = rng.choices(TEXT_KINDS, [share for _, share, _ in TEXT_KINDS])[0]
    return " ".join(make(rng).split())


def text_of_kind(kind):
    """The text maker of one of TEXT_KINDS."""
    return {name: make for name, _, make in TEXT_KINDS}[kind]


def espeak_available():
    return voices.available("espeak-ng")


#: The words numbers are said with.
NUMBER_WORDS = frozenset(_ONES + _TENS[2:] + ["hundred", "thousand", "and", "oh"])

#: How often an augmented utterance is read out a few words at a time:
#: numbers and digit strings (people read a PIN or a phone number out in
#: ones, twos and threes, with pauses), and other text.
DICTATED_SHARE = {"number": 0.4, "other": 0.05}


def dictated(text, speaker, rng, pause_s=(0.05, 0.5)):
    """text read out in groups of 1-3 words, each group said on its own
    (the prosody of a word said alone, which a synthesiser reading the whole
    text never gives) with a pause after it."""
    import numpy as np

    words = text.split()
    most = rng.choice([1, 1, 2, 3])
    parts = []
    while words:
        count = rng.randint(1, most)
        if parts:
            parts.append(np.zeros(int(rng.uniform(*pause_s) * SAMPLE_RATE), np.float32))
        parts.append(voices.speak(" ".join(words[:count]), speaker))
        words = words[count:]
    return np.concatenate(parts)


def utterance(rng, text, speaker, lead_s=(0.1, 0.8), trail_s=(0.4, 1.2),
              augmented=None, babble=(), dictate=None):
    """(audio, speech start s, speech end s, effects): text read by speaker
    with silence before and after.  Plain: at a random gain, with white
    noise at a random level.  augmented (a numpy Generator): through
    ``augment.voice`` and ``augment.scene``.  dictate: read a few words at a
    time (effect "dictated"); None: with ``DICTATED_SHARE``'s chance when
    augmented, else not."""
    import numpy as np

    effects = []
    if dictate is None:
        kind = "number" if NUMBER_WORDS.issuperset(text.split()) else "other"
        dictate = augmented is not None and augmented.random() < DICTATED_SHARE[kind]
    if dictate:
        speech = dictated(text, speaker, rng)
        effects.append("dictated")
    else:
        speech = voices.speak(text, speaker)
    if augmented is not None:
        speech, more = augment.voice(speech, augmented)
        effects += more
    peak = float(np.abs(speech).max()) or 1.0
    speech = speech * (rng.uniform(0.2, 0.9) / peak)
    lead = int(rng.uniform(*lead_s) * SAMPLE_RATE)
    trail = int(rng.uniform(*trail_s) * SAMPLE_RATE)
    audio = np.concatenate([np.zeros(lead, np.float32), speech,
                            np.zeros(trail, np.float32)])
    if augmented is not None:
        audio, more = augment.scene(audio, augmented, babble)
        effects += more
    else:
        noise_level = rng.choice([0.0, 0.001, 0.003, 0.01, 0.02, 0.04])
        if noise_level:
            noise = np.random.default_rng(rng.randrange(2 ** 32)).standard_normal(len(audio))
            audio = audio + noise_level * noise.astype(np.float32)
    audio = np.clip(audio, -1.0, 1.0).astype(np.float32)
    return audio, lead / SAMPLE_RATE, (lead + len(speech)) / SAMPLE_RATE, effects


def write_set(directory, count, pool, seed, eou=True, audio_format="wav",
              text=sentence, augmented=False, dictate=None):
    """Synthesise count utterances into directory and write its NeMo
    manifest (one JSON object a line: audio_filepath, duration, text, the
    speech start and end in seconds, the speaker and the effects).  pool: a
    ``voices.Pool`` to draw speakers from;
    text: a function of a ``random.Random`` that makes a text; dictate: as
    ``utterance``'s.  Returns the manifest's path."""
    import numpy as np
    import soundfile

    rng = random.Random(seed)
    effects_rng = np.random.default_rng(seed) if augmented else None
    babble = []
    os.makedirs(directory, exist_ok=True)
    manifest = os.path.join(directory, "manifest.json")
    with open(manifest, "w") as out:
        for i in range(count):
            words = text(rng)
            speaker = pool.draw(rng)
            audio, start, end, effects = utterance(rng, words, speaker, augmented=effects_rng,
                                                   babble=babble, dictate=dictate)
            if augmented:
                babble = (babble + [audio[int(start * SAMPLE_RATE):int(end * SAMPLE_RATE)]])[-8:]
            path = os.path.join(directory, "%05d.%s" % (i, audio_format))
            soundfile.write(path, audio, SAMPLE_RATE, subtype="PCM_16")
            out.write(json.dumps({
                "audio_filepath": os.path.abspath(path),
                "duration": round(len(audio) / SAMPLE_RATE, 4),
                "text": words + EOU if eou else words,
                "speech_start": round(start, 4), "speech_end": round(end, 4),
                "tts": attr.asdict(speaker), "effects": effects,
            }) + "\n")
    return manifest


def join_set(rows, directory, count, seed, most=3):
    """count streams of 2 to ``most`` utterances of rows back to back (each
    with the silences around it), so that a model also learns to go on
    after an ``<EOU>``; writes their audio and manifest into directory and
    returns the manifest's path."""
    import numpy as np
    import soundfile

    rng = random.Random(seed)
    os.makedirs(directory, exist_ok=True)
    manifest = os.path.join(directory, "manifest.json")
    with open(manifest, "w") as out:
        for i in range(count):
            parts = rng.sample(rows, rng.randint(2, most))
            audio = np.concatenate([soundfile.read(row["audio_filepath"], dtype="float32")[0]
                                    for row in parts])
            path = os.path.join(directory, "%05d.wav" % i)
            soundfile.write(path, audio, SAMPLE_RATE, subtype="PCM_16")
            out.write(json.dumps({
                "audio_filepath": os.path.abspath(path),
                "duration": round(len(audio) / SAMPLE_RATE, 4),
                "text": " ".join(row["text"] for row in parts),
            }) + "\n")
    return manifest


def read_manifest(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def word_errors(reference, hypothesis):
    """Word-level edit distance between two strings."""
    ref, hyp = reference.split(), hypothesis.split()
    row = list(range(len(hyp) + 1))
    for i, word in enumerate(ref, 1):
        previous, row[0] = row[0], i
        for j, other in enumerate(hyp, 1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1,
                                           previous + (word != other))
    return row[-1]


def word_error_rate(pairs):
    """Corpus WER of (reference, hypothesis) pairs: errors / reference words."""
    pairs = list(pairs)
    words = sum(len(ref.split()) for ref, _ in pairs)
    return sum(word_errors(ref, hyp) for ref, hyp in pairs) / max(1, words)
