"""
Fuzzing the client-facing protocol: random and mutated messages against
``messages.parse``, against a ``StreamSession``, and against a live server
over real loopback TCP and WebSocket connections.

How cases are generated
-----------------------

All messages come from one set of Hypothesis strategies (below): audio in
both encodings (speech-like, noise, silence, full-scale, tiny samples, f32
samples up to and just past ``F32_LIMIT``, loud and far out-of-range
samples up to 1e37, empty), pings, objects with a wrong value or a wrong
type in ``type``, ``data``, ``encoding`` or ``final``, random bytes and
text, broken UTF-8, lone surrogates, JSON that is not an object, JSON nested up to 100000
deep, NaN / Infinity literals and giant numbers (``1e400``, 1001 and 5000
literal digits), messages sized right around ``--max-message-bytes`` and far
over it, and byte-level mutations (flips, insertions, deletions, copies,
truncations) of valid messages.  Over WebSocket, binary messages of raw
samples are mixed in.

Each case is judged by a *reference model* written from the README's
protocol section (:func:`expect_text`, :func:`expect_binary`): what the
server must answer (exactly one ``error``, a ``pong``, nothing) and which
samples it must take in.  ``f32`` audio is refused when a sample is NaN or
infinite, or when its largest magnitude is over ``parakeet.audio.F32_LIMIT``
(2: [-1, 1] with room to spare), and for those two refusals the model also
knows the exact error text, which is checked.  Where the README leaves the choice to the
implementation, the model follows the standard library: ``json`` decides
what JSON is (it accepts NaN and Infinity; it refuses nesting past the
recursion limit and integers of more than 4300 digits), and
``binascii.a2b_base64(strict_mode=True)`` decides what base64 is.  Nesting
depths between 700 and 1100 are never generated, since where exactly the
recursion limit falls depends on the depth of the stack the parser runs on.

* ``messages.parse`` and ``StreamSession`` are synchronous, so there
  Hypothesis drives the test itself with ``@given``: thousands of single
  messages against ``parse``, and hundreds of message sequences against a
  session on a real registry (at 16 kHz and at rates the server resamples
  from, with ``--max-stream-seconds`` small enough to be reached), with the
  decode loop run over a fake engine afterwards to check that the stream is
  finished and released.  Failures there are shrunk as usual.
* Hypothesis cannot drive a test that waits on the reactor, so for the live
  server Hypothesis is used as a seeded generator only: a ``@given``
  function run with the generate phase alone collects a fixed number of
  message sequences (one per connection), and the test sends them all
  afterwards.  Nothing is shrunk, but the cases are reproducible and a
  failure names the connection and message.  They depend on the seed (set
  ``PARAKEET_FUZZ_SEED`` to draw others) and, as Hypothesis also draws
  constants from the code it finds loaded, on which test modules run; the
  report gives a digest of the cases drawn.  Fixed landmark messages (the
  deepest nesting, messages exactly at the size limit and one byte over,
  giant numbers, ...) are added to the first connections so that they are
  always covered.  Over TCP some lines end in ``\r\n`` and some are
  written in two pieces, a reactor turn apart.

What the live-server tests check
--------------------------------

Seven fuzzed connections run at once, each with a *shadow* connection that
sends just the audio the reference model says the server must accept, and
a *witness* connection that streams fixed speech-like audio throughout:

* every message gets exactly the answer the model predicts, in order (one
  ``error`` with a non-empty message per bad message, the exact text for
  refused ``f32`` samples, a ``pong`` per ping, nothing for audio), and
  nothing else arrives but results;
* each connection can still be finalized afterwards (with ``close`` or a
  final audio message) and gets exactly one final result (a missing one
  fails the test, over either transport), which covers exactly the accepted
  audio (``audio_ms``) and holds the same tokens as its shadow's: the
  rejected messages changed nothing;
* the witness decodes exactly to the offline decoding of its audio, however
  its batches were shared with the fuzzed streams;
* afterwards the registry is empty, the engine holds nothing, the status
  port answers, and a new connection works.

The fuzzed connections may send any samples at all: those the model says
are refused must be refused, and whatever is accepted (f32 samples up to
``F32_LIMIT`` included) must decode alongside the witness without harming
it.  ``OutOfRangeSamplesTests`` pins down the f32 refusal against a live
server, and ``tests.test_churn.FinalResultTestsMixin`` the delivery of the
final result before the WebSocket closing handshake ends.

The number of cases run is written to stderr: about 2000 single messages
against ``parse``, 250 sequences (about 2000 messages) against a session,
and over each transport seven connections of 45 to 65 messages plus the
landmarks, about 400 messages per transport.
"""

import base64
import binascii
import hashlib
import json
import os
import sys

import attr
import numpy as np
from hypothesis import HealthCheck, Phase, assume, given, seed, settings
from hypothesis import strategies as st
from twisted.internet import defer, reactor, task
from twisted.internet.testing import MemoryReactorClock
from twisted.trial import unittest

from parakeet.clients import connection
from parakeet.server import messages
from parakeet.audio import F32_LIMIT, encode_samples
# Checked against the standard library's G.711 decoder in test_audio.
from parakeet.audio import _MULAW as MULAW_TABLE
from parakeet.server.protocol import Limits, StreamSession
from parakeet.server.registry import StreamRegistry
from parakeet.clients.audiofiles import calibration_audio
from parakeet.server.decodeloop import DecodeLoop

from .support.fakes import FakeChannel, FakeEngine, FakeLoop
from .support.models import GEOMETRY, assert_engine_idle, offline_tokens, quantized, speechlike
from .support.servers import ServerTestMixin, wait_for

#: --max-message-bytes of the fuzzed server: large enough for JSON nested
#: 100000 deep (100000 bytes of "["), small enough that audio filling a
#: message stays cheap to decode.
LIMIT = 100 * 1024

SEED = int(os.environ.get("PARAKEET_FUZZ_SEED", "20251125"))

PARSE_EXAMPLES = 2000
SESSION_EXAMPLES = 250
CONNECTIONS = 7           # fuzzed connections per transport (each with a shadow)
MESSAGES_PER_CONNECTION = (45, 65)
MAX_ACCEPTED_SAMPLES = 40000  # per fuzzed connection, landmarks aside

RATE = 16000
HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
          HealthCheck.large_base_example]


def report(text):
    sys.stderr.write("fuzz: %s\n" % (text,))
    sys.stderr.flush()


# JSON text, built by hand so that any literal can go anywhere

@attr.s(frozen=True)
class Raw:
    """JSON text put into a message verbatim (NaN, 1e400, 5000 digits, ...)."""
    text = attr.ib()


@attr.s(frozen=True)
class Obj:
    """A JSON object as (key, value) pairs: keys may repeat."""
    pairs = attr.ib()


def to_json(value, compact=True, ascii_only=True):
    item, key = (",", ":") if compact else (", ", ": ")
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, Obj):
        return "{" + item.join(json.dumps(k, ensure_ascii=ascii_only) + key
                               + to_json(v, compact, ascii_only)
                               for k, v in value.pairs) + "}"
    if isinstance(value, list):
        return "[" + item.join(to_json(v, compact, ascii_only) for v in value) + "]"
    return json.dumps(value, ensure_ascii=ascii_only)


def to_bytes(text):
    # A lone surrogate written raw becomes bytes that are not UTF-8.
    return text.encode("utf-8", "surrogatepass")


def b64(payload):
    return base64.b64encode(payload).decode("ascii")


# The reference model

@attr.s(frozen=True)
class Outcome:
    """What the server must do with one message.

    kind: "error", "pong", "audio" (samples taken in), "finish" (close, or
    audio with final: true), "ignored" (a blank TCP line) or "stateful" (a
    valid config or flush, or audio declaring a sample rate: they change how
    later messages are taken, which the model does not follow, so sequences
    holding one are not used).  message: the
    exact text of the error, where the model fixes it (refused f32 samples).
    """
    kind = attr.ib()
    samples = attr.ib(default=None, repr=False)
    too_large = attr.ib(default=False)
    message = attr.ib(default=None)

    @property
    def reply(self):
        """The one reply the message gets, if any: ("error", too_large) or ("pong", None)."""
        if self.kind == "error":
            return ("error", self.too_large)
        if self.kind == "pong":
            return ("pong", None)
        return None


ERROR = Outcome("error")
TOO_LARGE = Outcome("error", too_large=True)


F32_NOT_FINITE = "f32 audio contains NaN or infinite samples"
F32_OUT_OF_RANGE = "f32 audio must lie in [-1, 1]: got a sample of magnitude %.3g"


def reference_samples(payload, encoding):
    """(samples, None) for a payload the server must take in, or (None, text)
    for one it must refuse, text being the error's exact text where the
    model fixes it (refused f32 sample values) and None elsewhere."""
    if encoding == "pcm16":
        if len(payload) % 2:
            return None, None
        return np.frombuffer(payload, "<i2").astype(np.float32) / np.float32(32768), None
    if encoding == "f32":
        if len(payload) % 4:
            return None, None
        samples = np.frombuffer(payload, "<f4").astype(np.float32)
        if not np.isfinite(samples).all():
            return None, F32_NOT_FINITE
        peak = float(np.abs(samples).max()) if len(samples) else 0.0
        if peak > F32_LIMIT:
            return None, F32_OUT_OF_RANGE % (peak,)
        return samples, None
    if encoding == "mulaw":
        return MULAW_TABLE[np.frombuffer(payload, np.uint8)], None
    return None, None


def valid_rate(value):
    return type(value) is int and 8000 <= value <= 48000


def expect_text(raw, limit=None, tcp=False):
    """What a text message (a TCP line without its "\\n", a WebSocket text
    message) must get."""
    if limit is not None and len(raw) > limit:
        return TOO_LARGE
    if tcp and raw.isspace() or tcp and not raw:
        return Outcome("ignored")
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return ERROR
    if not isinstance(obj, dict):
        return ERROR
    kind = obj.get("type")
    if kind == "ping":
        return Outcome("pong")
    if kind == "close":
        return Outcome("finish")
    if kind == "flush":
        return Outcome("stateful")
    if kind == "config":
        encoding = obj.get("encoding")
        if encoding is not None and encoding not in ("pcm16", "f32", "mulaw"):
            return ERROR
        if "sample_rate" in obj and not valid_rate(obj["sample_rate"]):
            return ERROR
        return Outcome("stateful")
    if kind != "audio":
        return ERROR
    final = obj.get("final", False)
    if final is not True and final is not False:
        return ERROR
    encoding = obj.get("encoding", "pcm16")
    if not isinstance(encoding, str):
        return ERROR
    if "sample_rate" in obj:
        return Outcome("stateful") if valid_rate(obj["sample_rate"]) else ERROR
    data = obj.get("data")
    if data is None:
        data = ""
    if not isinstance(data, str):
        return ERROR
    try:
        payload = binascii.a2b_base64(data.encode("ascii"), strict_mode=True)
    except (UnicodeEncodeError, binascii.Error):
        return ERROR
    samples, refusal = reference_samples(payload, encoding)
    if samples is None:
        return Outcome("error", message=refusal)
    return Outcome("finish" if final else "audio", samples)


def expect_binary(payload, encoding, limit=None):
    """What a binary WebSocket message must get on a connection of encoding."""
    if limit is not None and len(payload) > limit:
        return TOO_LARGE
    samples, refusal = reference_samples(payload, encoding)
    if samples is None:
        return Outcome("error", message=refusal)
    return Outcome("audio", samples)


def tcp_lines(chunks):
    """The lines the server reads from chunks written to one TCP connection."""
    lines = b"".join(chunks).split(b"\n")
    assert lines[-1] == b"", "the last chunk must end a line"
    return lines[:-1]


def expect_connection(items, finalizer, transport, encoding, limit=LIMIT):
    """Replies and accepted samples for one connection's messages, and the
    finalizer's samples; None if some message in the middle would finish
    the stream (the generators throw those away)."""
    outcomes = []
    if transport == "tcp":
        for line in tcp_lines([chunk for chunk, _ in items]):
            outcomes.append(expect_text(line, limit, tcp=True))
    else:
        for kind, raw in items:
            if kind == "text":
                outcomes.append(expect_text(raw, limit))
            else:
                outcomes.append(expect_binary(raw, encoding, limit))
    if any(o.kind in ("finish", "stateful") for o in outcomes):
        return None
    if transport == "tcp":
        finalizer = finalizer[:-1]  # its "\n"
    final = expect_text(finalizer, limit, tcp=transport == "tcp")
    assert final.kind == "finish", finalizer
    replies = [o.reply for o in outcomes if o.reply is not None]
    pieces = [o.samples for o in outcomes if o.kind == "audio"]
    if final.samples is not None:
        pieces.append(final.samples)
    audio = np.concatenate(pieces) if pieces else np.zeros(0, np.float32)
    return replies, audio, outcomes


# Strategies

def weighted(*pairs):
    """One of the strategies, each drawn with its weight."""
    choices = [strategy for weight, strategy in pairs for _ in range(weight)]
    return st.sampled_from(choices).flatmap(lambda strategy: strategy)


SAMPLE_KINDS = ("speech", "noise", "silence", "square", "quiet", "hot", "edge", "loud",
                "huge")


def make_samples(kind, seed_value, n):
    """n float32 samples of a kind, reproducible from seed_value."""
    rng = np.random.default_rng(seed_value)
    if kind == "speech":
        return calibration_audio(seed_value, n / RATE + 0.01)[:n]
    if kind == "noise":
        return rng.uniform(-1.0, 1.0, n).astype(np.float32)
    if kind == "silence":
        return np.zeros(n, np.float32)
    if kind == "square":
        return np.where(rng.standard_normal(n) > 0, 1.0, -1.0).astype(np.float32)
    if kind == "quiet":  # down to float32 subnormals
        return (rng.standard_normal(n) * 1e-40).astype(np.float32)
    if kind == "hot":  # past [-1, 1] but within F32_LIMIT: accepted as f32
        return rng.uniform(-F32_LIMIT, F32_LIMIT, n).astype(np.float32)
    if kind == "edge":  # noise with one peak at F32_LIMIT, or one float32 step either side
        samples = rng.uniform(-1.0, 1.0, n).astype(np.float32)
        if n:
            limit = np.float32(F32_LIMIT)
            peak = [limit, np.nextafter(limit, np.float32(np.inf)),
                    np.nextafter(limit, np.float32(0))][rng.integers(3)]
            samples[rng.integers(n)] = peak if rng.integers(2) else -peak
        return samples
    # Out of range (refused as f32, clipped to full scale as pcm16): loud, or
    # far out, up to 1e37 (and still finite in float32).
    if kind == "loud":
        return (rng.standard_normal(n) * 20.0).astype(np.float32)
    return (rng.standard_normal(n) * 10.0 ** rng.uniform(3, 37)).astype(np.float32)


sample_counts = st.one_of(st.just(0), st.integers(1, 200), st.integers(200, 2400))
samples_strategy = st.builds(make_samples, st.sampled_from(SAMPLE_KINDS),
                             st.integers(0, 2 ** 31), sample_counts)

SPECIAL_LITERALS = [
    "NaN", "Infinity", "-Infinity", "1e400", "-1e400", "1E-400", "-0", "0e0",
    "1" + "0" * 1000,                 # 10**1000 as literal digits: parses
    "9" * 5000,                       # past Python's 4300-digit limit: does not
    "123456789012345678901234567890.5e-3",
    '"\\ud800"', '"\\udfff\\ud800x"', '"\\u0000"', '"\\uFFFF"',
]
specials = st.sampled_from(SPECIAL_LITERALS).map(Raw)
surrogate_text = st.text(alphabet=st.characters(categories=["Cs"]), min_size=1, max_size=3)
json_leaves = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(),
                        st.text(max_size=12), specials, surrogate_text)
json_values = st.recursive(
    json_leaves,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.lists(st.tuples(st.text(max_size=5), inner), max_size=3).map(Obj)),
    max_leaves=6)

FIELDS = ("type", "data", "encoding", "final")
extra_fields = st.lists(
    st.tuples(st.text(max_size=6).filter(lambda k: k not in FIELDS), json_values),
    max_size=2)


@st.composite
def serialized(draw, obj):
    """obj as message bytes, in one of the ways a client might write it."""
    text = to_json(obj, compact=draw(st.booleans()), ascii_only=draw(st.booleans()))
    if draw(st.integers(0, 9)) == 0:
        text = draw(st.sampled_from([" ", "\t", "  \t"])) + text + draw(
            st.sampled_from(["", " ", "\t", " \t "]))
    return to_bytes(text)


@st.composite
def audio_objects(draw, final=None, samples=samples_strategy):
    """A valid audio message as an Obj; final: None (left out or false) or True."""
    encoding = draw(st.sampled_from([None, "pcm16", "f32"]))
    payload = encode_samples(draw(samples), encoding or "pcm16")
    pairs = [("type", "audio")]
    if payload:
        pairs.append(("data", b64(payload)))
    else:
        empty = draw(st.sampled_from(["", None, "absent"]))
        if empty != "absent":
            pairs.append(("data", empty))
    if encoding is not None:
        pairs.append(("encoding", encoding))
    if final:
        pairs.append(("final", True))
    elif draw(st.booleans()):
        pairs.append(("final", False))
    pairs += draw(extra_fields)
    return Obj(draw(st.permutations(pairs)))


def valid_audio(final=None):
    return audio_objects(final).flatmap(serialized)


@st.composite
def pings(draw):
    pairs = [("type", "ping")] + draw(extra_fields)
    return draw(serialized(Obj(draw(st.permutations(pairs)))))


NEAR_TYPES = ["Audio", "AUDIO", "audio ", " audio", "", "ping\x00", "clos", "pong", "hello",
              "result", "error", "status", "\u0430udio", "audio\ud800", "a" * 5000]
NEAR_ENCODINGS = ["PCM16", "Pcm16", "f64", "float32", "s16le", "", "pcm16 ", "f32\x00",
                  "pcm", "\ud800", "x" * 20000]
BAD_BASE64 = st.one_of(
    st.text(alphabet="ABCDEFab019+/=-_ \t\n\r.*\u00e9", max_size=40),
    st.sampled_from(["A", "AAA", "AA=", "=AAA", "AA==AA==", "AA=A", "AAAA AAAA",
                     "AAAA\n", "-_-_", "AAA\u00e9"]),
    st.binary(min_size=1, max_size=31).filter(lambda b: len(b) % 2).map(b64))
BAD_VALUES = {
    "type": st.one_of(json_values, st.sampled_from(NEAR_TYPES), st.text(max_size=80)),
    "data": st.one_of(json_values, BAD_BASE64),
    "encoding": st.one_of(json_values, st.sampled_from(NEAR_ENCODINGS), st.text(max_size=20)),
    "final": st.one_of(json_values, st.sampled_from([Raw("1e400"), Raw("1" + "0" * 1000),
                                                     "true", "false", 0, 1, None, []])),
}


@st.composite
def wrong_fields(draw):
    """A valid audio message with one field given a wrong value or type, or left out."""
    pairs = list(draw(audio_objects()).pairs)
    field = draw(st.sampled_from(FIELDS + ("no-type", "two-types")))
    if field == "no-type":
        pairs = [(k, v) for k, v in pairs if k != "type"]
    elif field == "two-types":  # the last one counts
        pairs.append(("type", draw(BAD_VALUES["type"])))
    else:
        bad = draw(BAD_VALUES[field])
        pairs = [(k, v) for k, v in pairs if k != field]
        pairs.insert(draw(st.integers(0, len(pairs))), (field, bad))
    return draw(serialized(Obj(pairs)))


BROKEN_UTF8 = [b"\xff", b"\xfe", b"\x80", b"\xc0\xaf", b"\xc3", b"\xe2\x82", b"\xed\xa0\x80",
               b"\xed\xbf\xbf", b"\xf4\x90\x80\x80", b"\xf8\x88\x80\x80\x80", b"\xef\xbb\xbf"]


@st.composite
def broken_utf8(draw):
    base = draw(st.one_of(pings(), valid_audio()))
    at = draw(st.integers(0, len(base)))
    return base[:at] + draw(st.sampled_from(BROKEN_UTF8)) + base[at:]


@st.composite
def deep_nesting(draw):
    depth = draw(st.one_of(st.integers(1, 700), st.integers(1100, 100000), st.just(100000)))
    shape = draw(st.sampled_from(["open", "arrays", "objects", "in-ping", "in-final"]))
    if shape == "open":
        return b"[" * depth
    if shape == "arrays":
        return b"[" * depth + b"]" * depth
    if shape == "objects":
        return b'{"a":' * depth + b"0" + b"}" * depth
    inner = b"[" * depth + b"]" * depth
    if shape == "in-ping":
        return b'{"type":"ping","x":' + inner + b"}"
    return b'{"type":"audio","data":"","final":' + inner + b"}"


@st.composite
def sized(draw, limit=LIMIT):
    """Messages right at the size limit, just over it, and far over it."""
    target = draw(st.one_of(st.integers(limit - 3, limit + 3), st.integers(limit // 2, limit),
                            st.integers(limit + 4, 2 * limit)))
    shape = draw(st.sampled_from(["ping-string", "ping-array", "audio-spaces", "garbage"]))
    if shape == "ping-string":
        head, tail, fill = b'{"type":"ping","pad":"', b'"}', b"x"
    elif shape == "ping-array":
        head, tail, fill = b'{"type":"ping","pad":[0', b']}', b",1"
    elif shape == "audio-spaces":
        audio = draw(valid_audio())
        head, tail, fill = audio[:-1], b"}", b" "
    else:
        head, tail, fill = b"", b"", draw(st.sampled_from([b"x", b"\xff", b"[", b" "]))
    room = max(0, target - len(head) - len(tail))
    return head + (fill * (room // len(fill) + 1))[:room] + tail


@st.composite
def mutated(draw):
    """A valid message with a few byte-level mutations."""
    data = bytearray(draw(st.one_of(pings(), valid_audio(), valid_audio(final=True))))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "copy", "truncate"]))
        at = draw(st.integers(0, len(data)))
        if op == "flip" and at < len(data):
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=4))
        elif op == "delete":
            del data[at:at + draw(st.integers(1, 8))]
        elif op == "copy":
            data[at:at] = data[draw(st.integers(0, len(data))):][:draw(st.integers(1, 16))]
        else:
            del data[at:]
    return bytes(data)


non_objects = st.tuples(json_values, st.booleans()).map(
    lambda vb: to_bytes(to_json(vb[0], ascii_only=vb[1]))).filter(lambda b: not b.startswith(b"{"))

text_messages = weighted(
    (6, valid_audio()),
    (3, pings()),
    (6, wrong_fields()),
    (2, st.binary(max_size=300)),
    (1, st.text(max_size=100).map(to_bytes)),
    (2, non_objects),
    (2, broken_utf8()),
    (2, deep_nesting()),
    (1, sized()),
    (4, mutated()),
    (1, st.sampled_from([b"", b" ", b"\t", b"\r", b" \r", b"{}", b"null"])),
)

finalizers = weighted(
    (2, st.builds(lambda extras: to_bytes(to_json(Obj([("type", "close")] + extras))),
                  extra_fields)),
    (2, valid_audio(final=True)),
    (1, st.sampled_from([b'{"type":"audio","final":true}',
                         b'{"type":"audio","data":null,"final":true}',
                         b'{"final": true, "data": "", "type": "audio"}'])),
).filter(lambda raw: expect_text(raw).kind == "finish")


@st.composite
def binary_messages(draw, limit=LIMIT):
    kind = draw(st.sampled_from(["audio"] * 5 + ["bytes", "odd", "non-finite", "over"]))
    if kind == "audio":
        return encode_samples(draw(samples_strategy), draw(st.sampled_from(["pcm16", "f32"])))
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    if kind == "odd":
        return draw(st.binary(min_size=1, max_size=99).filter(lambda b: len(b) % 2))
    if kind == "non-finite":
        values = draw(st.lists(st.sampled_from([0.0, 0.5, np.nan, np.inf, -np.inf]),
                               min_size=1, max_size=20))
        return np.array(values, "<f4").tobytes()
    return b"\x01\x00" * ((limit + draw(st.integers(1, 200))) // 2 + 1)


@st.composite
def tcp_items(draw):
    """A chunk written to the TCP connection (a message and its "\\n" or
    "\\r\\n") and where to split it into two writes, if anywhere."""
    raw = draw(text_messages)
    chunk = raw + draw(st.sampled_from([b"\n", b"\n", b"\r\n"]))
    split = draw(st.one_of(st.none(), st.integers(1, max(1, len(chunk) - 1))))
    return chunk, split


# Past four times the limit a WebSocket message fails the connection (close
# code 1009; test_end_to_end covers it), so the fuzzing stays below that.
ws_items = weighted((3, st.tuples(st.just("text"), text_messages)),
                    (1, st.tuples(st.just("binary"), binary_messages()))
                    ).filter(lambda item: len(item[1]) <= 4 * LIMIT)


def _acceptable(case, transport):
    items, finalizer = case[0], case[1]
    encoding = case[2] if transport == "ws" else "pcm16"
    expected = expect_connection(items, finalizer, transport, encoding)
    if expected is None:
        return False
    return len(expected[1]) <= MAX_ACCEPTED_SAMPLES


tcp_connections = st.tuples(
    st.lists(tcp_items(), min_size=MESSAGES_PER_CONNECTION[0],
             max_size=MESSAGES_PER_CONNECTION[1]),
    finalizers.map(lambda raw: raw + b"\n"),
).filter(lambda case: _acceptable(case, "tcp"))

ws_connections = st.tuples(
    st.lists(ws_items, min_size=MESSAGES_PER_CONNECTION[0],
             max_size=MESSAGES_PER_CONNECTION[1]),
    finalizers,
    st.sampled_from(["pcm16", "f32"]),
).filter(lambda case: _acceptable(case, "ws"))


def draw_examples(strategy, count):
    """count examples of strategy, drawn by Hypothesis from SEED (generation only)."""
    drawn = []

    @settings(max_examples=count, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=HEALTH)
    @seed(SEED)
    @given(strategy)
    def collect(example):
        drawn.append(example)

    collect()
    if len(drawn) < count:
        raise AssertionError("Hypothesis drew %d examples, not %d" % (len(drawn), count))
    return drawn[:count]


# Landmarks: always sent, whatever the generators draw

def audio_line(size, encoding="f32", seed_value=99):
    """A valid audio message of exactly size bytes: as much audio as fits,
    then spaces."""
    per_sample = {"pcm16": 2, "f32": 4}[encoding]
    head = b'{"type":"audio","encoding":"%s","data":"' % encoding.encode()
    room = size - len(head) - 2
    n = (room // 4 * 3) // per_sample
    payload = encode_samples(speechlike(seed_value, n / RATE + 0.01)[:n], encoding)
    message = head + base64.b64encode(payload) + b'"'
    return message + b" " * (size - len(message) - 1) + b"}"


def f32_line(*values):
    """An f32 audio message holding exactly these sample values."""
    return b'{"type":"audio","encoding":"f32","data":"%s"}' % base64.b64encode(
        np.array(values, "<f4").tobytes())


_LIMIT32 = np.float32(F32_LIMIT)
_OVER_LIMIT = np.nextafter(_LIMIT32, np.float32(np.inf))

#: f32 samples right around F32_LIMIT and far past it (pcm16 values sent
#: as f32, overflowing magnitudes, the largest float32, NaN beside them).
F32_LANDMARK_SAMPLES = [
    (0.25, F32_LIMIT, -0.5), (-F32_LIMIT,), (0.0, np.nextafter(_LIMIT32, np.float32(0))),
    (0.1, _OVER_LIMIT), (-_OVER_LIMIT,), (2.5,), (-20.0, 0.0), (12000.0, -32768.0),
    (1e20,) * 8, (0.0, 1e38), (np.finfo(np.float32).max,), (1e38, np.nan), (np.inf, 3.0),
]

TEXT_LANDMARKS = [
    b"[" * 100000,
    b"[" * 100000 + b"]" * 100000,
    b'{"type":"ping","x":' + b"[" * 20000 + b"]" * 20000 + b"}",
    b'{"type":"audio","final":1e400}',
    b'{"type":"audio","data":"","final":' + b"1" + b"0" * 1000 + b"}",
    b'{"type":"ping","n":' + b"9" * 5000 + b"}",
    b'{"type":"ping","n":' + b"1" + b"0" * 1000 + b",\"m\":1e400}",
    b'{"type":"ping","x":NaN,"y":Infinity,"z":-Infinity}',
    b"NaN", b"-Infinity", b"1e400",
    b'{"type":"audio","data":""}', b'{"type":"audio","data":null}', b'{"type":"audio"}',
    b'{"type":"audio","data":"","encoding":"f32","final":false}',
    b"\xff\xfe", b'{"type":"\xed\xa0\x80"}', b'{"type":"\\ud800"}',
    b'{"type":"audio","data":"AAAA","encoding":"\\udfff"}',
] + [f32_line(*values) for values in F32_LANDMARK_SAMPLES]


def tcp_landmarks():
    return [(raw + b"\n", None) for raw in TEXT_LANDMARKS] + [
        (audio_line(LIMIT) + b"\n", 1000),           # exactly at the limit: decoded
        (audio_line(LIMIT + 1) + b"\n", LIMIT // 2),  # one byte over: refused
        (b'{"type":"ping","pad":"' + b"x" * (LIMIT - 25) + b'"}\r\n', None),  # LIMIT with "\r"
        (b"x" * (3 * LIMIT) + b"\n", 7),              # far over, in two writes
    ]


def ws_text_landmarks():
    return [("text", raw) for raw in TEXT_LANDMARKS] + [
        ("text", audio_line(LIMIT)), ("text", audio_line(LIMIT + 1)), ("text", b""),
        ("text", b"x" * (2 * LIMIT))]


def ws_binary_landmarks(encoding):
    """The largest binary message allowed, larger ones, and odd ones."""
    size = {"pcm16": 2, "f32": 4}[encoding]
    n = LIMIT // size
    at_limit = encode_samples(speechlike(98, n / RATE + 0.01)[:n], encoding)
    return [("binary", b""), ("binary", at_limit), ("binary", at_limit + b"\0" * size),
            ("binary", b"\0" * (2 * LIMIT)), ("binary", b"\0\0\xc0\x7f"),
            ("binary", b"\0\0\x80\x7f"), ("binary", b"\0")] + [
        ("binary", np.array(values, "<f4").tobytes()) for values in F32_LANDMARK_SAMPLES]


# The synchronous layers, under @given

class ReferenceModelTests(unittest.TestCase):
    """The reference model agrees with the README's examples (it judges everything else)."""

    def test_examples(self):
        self.assertEqual(expect_text(b'{"type":"ping"}').kind, "pong")
        self.assertEqual(expect_text(b'{"type":"close"}').kind, "finish")
        self.assertEqual(expect_text(b'{"type":"audio","data":"AAD/fw=="}').samples.tolist(),
                         [0.0, 32767 / 32768])
        self.assertEqual(expect_text(b'{"type":"audio","final":true}').kind, "finish")
        for bad in [b"{not json", b"[1, 2]", b'{"data": ""}', b'{"type": "shout"}',
                    b'{"type": "audio", "data": "***"}', b'{"type":"audio","final":"yes"}',
                    b'{"type": "audio", "data": "AAAA", "encoding": "mp3"}',
                    b'{"type": "audio", "data": "AAAA"}', b"\xff\xfe", b"[" * 100000]:
            self.assertEqual(expect_text(bad), ERROR, bad)
        self.assertEqual(expect_text(b"x" * 11, limit=10), TOO_LARGE)
        self.assertEqual(expect_text(b" \r", tcp=True).kind, "ignored")
        self.assertEqual(expect_binary(b"\0\0\0", "pcm16"), ERROR)
        self.assertEqual(expect_binary(b"\0\0", "f32"), ERROR)
        self.assertEqual(expect_binary(np.array([np.nan], "<f4").tobytes(), "f32"),
                         Outcome("error", message="f32 audio contains NaN or infinite samples"))
        self.assertEqual(expect_binary(np.array([1e20, np.inf], "<f4").tobytes(), "f32"),
                         Outcome("error", message="f32 audio contains NaN or infinite samples"))
        # f32 samples: up to F32_LIMIT (2) in magnitude, no further.
        self.assertEqual(F32_LIMIT, 2.0)
        self.assertEqual(expect_text(f32_line(0.5, -2.0)).samples.tolist(), [0.5, -2.0])
        self.assertEqual(expect_binary(np.array([2.0], "<f4").tobytes(), "f32").kind, "audio")
        self.assertEqual(expect_binary(b"", "f32").kind, "audio")
        self.assertEqual(
            expect_text(f32_line(0.5, 1e20)),
            Outcome("error", message="f32 audio must lie in [-1, 1]: got a sample of "
                                     "magnitude 1e+20"))
        self.assertEqual(
            expect_binary(np.array([-2.5, 0.0], "<f4").tobytes(), "f32"),
            Outcome("error", message="f32 audio must lie in [-1, 1]: got a sample of "
                                     "magnitude 2.5"))
        self.assertEqual(expect_text(f32_line(_OVER_LIMIT)).kind, "error")
        # The same bytes as pcm16 are just loud.
        self.assertEqual(expect_binary(np.array([1e20], "<f4").tobytes(), "pcm16").kind,
                         "audio")
        self.assertEqual(len(audio_line(LIMIT)), LIMIT)
        self.assertEqual(expect_text(audio_line(LIMIT), LIMIT).kind, "audio")


class ParseFuzzTests(unittest.TestCase):
    """``messages.parse`` and ``StreamSession`` against the reference model."""

    def test_parse(self):
        """Every message parses to what the model says, or raises ProtocolError
        with a non-empty message that can be sent back as JSON; nothing else
        is ever raised."""
        counts = {}

        @settings(max_examples=PARSE_EXAMPLES, database=None, deadline=None,
                  suppress_health_check=HEALTH)
        @seed(SEED)
        @given(weighted((8, text_messages), (1, finalizers), (1, valid_audio(final=True))))
        def check(raw):
            expected = expect_text(raw)
            counts[expected.kind] = counts.get(expected.kind, 0) + 1
            if expected.message is not None:
                counts["f32 refusals"] = counts.get("f32 refusals", 0) + 1
            try:
                message = messages.parse(raw)
            except messages.ProtocolError as e:
                text = str(e)
                self.assertEqual(expected.kind, "error", (raw[:200], text))
                if expected.message is not None:
                    self.assertEqual(text, expected.message, raw[:200])
                self.assertIsInstance(text, str)
                self.assertTrue(text.strip(), raw[:200])
                sent = json.loads(messages.encode(messages.error(text)).decode("utf-8"))
                self.assertEqual(sent, {"type": "error", "message": text})
                return
            self.assertNotEqual(expected.kind, "error", raw[:200])
            if expected.kind == "pong":
                self.assertIsInstance(message, messages.Ping)
            elif expected.kind == "finish" and expected.samples is None:
                self.assertIsInstance(message, messages.Close)
            else:
                self.assertIsInstance(message, messages.Audio)
                self.assertEqual(message.final, expected.kind == "finish")
                self.assertEqual(message.samples.dtype, np.float32)
                np.testing.assert_array_equal(message.samples, expected.samples)

        check()
        report("messages.parse: %d cases (%s)" % (
            sum(counts.values()), ", ".join("%s %d" % kv for kv in sorted(counts.items()))))

    def test_session(self):
        """A session answers each message of a random sequence (text and
        binary, finalizers and audio past --max-stream-seconds included) as
        the model says, takes in exactly the accepted samples, and ends with
        one final result covering them (or nothing, when the client went
        away), leaving the registry empty."""
        counts = {"sequences": 0, "messages": 0, "f32 refusals": 0}

        @settings(max_examples=SESSION_EXAMPLES, database=None, deadline=None,
                  suppress_health_check=HEALTH)
        @seed(SEED)
        @given(items=st.lists(st.one_of(
                   st.tuples(st.just("text"), st.one_of(text_messages, finalizers)),
                   st.tuples(st.just("binary"), binary_messages())), min_size=5, max_size=30),
               encoding=st.sampled_from(["pcm16", "f32", "mp3"]),
               max_seconds=st.sampled_from([0.01, 0.1, 0.5, 300.0]),
               ending=st.sampled_from(["close", "final", "lost"]),
               rate=st.sampled_from([RATE, RATE, 8000, 44100]))
        def check(items, encoding, max_seconds, ending, rate):
            counts["sequences"] += 1
            counts["messages"] += len(items)
            self.check_session(items, encoding, max_seconds, ending, rate, counts)

        check()
        report("StreamSession: %(sequences)d sequences, %(messages)d messages "
               "(%(f32 refusals)d f32 samples refused)" % counts)

    def check_session(self, items, encoding, max_seconds, ending, rate, counts=None):
        registry = StreamRegistry(1, GEOMETRY, rate, MemoryReactorClock())
        channel, loop = FakeChannel(), FakeLoop()
        session = StreamSession(registry, loop, Limits(max_stream_seconds=max_seconds),
                                channel, "websocket")
        session.connection_made()
        self.assertEqual(channel.sent[0]["type"], "hello")
        room = int(max_seconds * rate)
        received, finishing = 0, False
        if ending == "close":
            items = items + [("text", b'{"type":"close"}')]
        elif ending == "final":
            items = items + [("text", b'{"type":"audio","final":true}')]
        for kind, raw in items:
            before = len(channel.sent)
            if kind == "text":
                session.message_received(raw)
                outcome = expect_text(raw)
            else:
                session.audio_received(raw, encoding)
                outcome = expect_binary(raw, encoding)
            replies = channel.sent[before:]
            # What the model does not follow is not checked.
            assume(outcome.kind != "stateful")
            fragment = None
            if outcome.message is not None and counts is not None:
                counts["f32 refusals"] += 1
            if outcome.kind in ("error", "pong"):
                want = [outcome.kind]
            elif outcome.samples is None:  # close
                want, finishing = [], True
            elif finishing:
                want, fragment = ["error"], "audio after the end of the stream"
            elif len(outcome.samples) > room - received:
                received = max(room, received)
                want, fragment = ["error"], "stream exceeded --max-stream-seconds"
                finishing = True
            else:
                received += len(outcome.samples)
                want = []
                finishing = finishing or outcome.kind == "finish"
            self.assertEqual([m["type"] for m in replies], want, (kind, raw[:200], replies))
            for reply in replies:
                if reply["type"] == "error":
                    self.assertIsInstance(reply["message"], str)
                    self.assertTrue(reply["message"].strip())
                    if outcome.message is not None:
                        self.assertEqual(reply["message"], outcome.message)
                    elif fragment:
                        self.assertIn(fragment, reply["message"])
            self.assertEqual(session.stream.received, received)
        self.assertEqual(session.stream.finishing, finishing)
        # The loop is asked to decode when the stream ends, or when audio
        # completes a chunk (the fake loop decodes nothing, so it stays ready).
        self.assertEqual(loop.steps > 0, finishing or session.stream.cutter.ready)
        if ending == "lost":
            session.connection_lost()
            self.assertTrue(session.stream.finishing)
        # Decode what the stream holds to its end, with a fake engine.
        sent_before = len(channel.sent)
        decoder = DecodeLoop(FakeEngine(GEOMETRY), registry, MemoryReactorClock(),
                             run_step=lambda f, *args: defer.maybeDeferred(f, *args))
        model_samples = session.stream.cutter.received
        for _ in range(model_samples // GEOMETRY.hop + 10):
            if not len(registry):
                break
            decoder.step()
        self.assertEqual(len(registry), 0)
        results = channel.sent[sent_before:]
        if ending == "lost":
            self.assertEqual(results, [])
            return
        self.assertEqual({m["type"] for m in results}, {"result"})
        self.assertEqual([m["is_final"] for m in results],
                         [False] * (len(results) - 1) + [True])
        self.assertTrue(channel.closed)
        # The fake engine emits each chunk's frame count: together, the
        # frames of exactly the accepted audio (once resampled, if it was).
        frames = sum(t for m in results for t in m["token_ids"])
        self.assertEqual(frames, GEOMETRY.frames_for(model_samples))
        self.assertEqual(results[-1]["audio_ms"], round(model_samples * 1000 / RATE, 3))
        if rate == RATE:
            self.assertEqual(model_samples, received)
        else:
            self.assertLessEqual(abs(model_samples - received * RATE / rate),
                                 RATE / 100 + 1)


# The live server

_witness = {}


def witness_audio():
    """Fixed audio for the witness stream and its offline decoding (computed once)."""
    if "audio" not in _witness:
        _witness["audio"] = quantized(speechlike(4242, 1.2)).astype(np.float32)
    return _witness["audio"]


def witness_expected(engine):
    if "tokens" not in _witness:
        _witness["tokens"], _ = offline_tokens(engine, witness_audio())
    return _witness["tokens"]


@defer.inlineCallbacks
def settle(predicate, timeout=120.0):
    """Whether predicate() came true within timeout seconds."""
    deadline = reactor.seconds() + timeout
    while not predicate():
        if reactor.seconds() > deadline:
            return False
        yield task.deferLater(reactor, 0.01, lambda: None)
    return True


def describe(raw, size=120):
    text = repr(raw[:size])
    return text + ("... (%d bytes)" % len(raw) if len(raw) > size else "")


class SocketFuzzMixin(ServerTestMixin):

    timeout = 300

    def setUp(self):
        self.start_server("--max-num-streams", "16", "--max-message-bytes", str(LIMIT))

    def cases(self):
        raise NotImplementedError

    def send_item(self, client, item):
        raise NotImplementedError

    def send_shadow_audio(self, shadow, audio):
        raise NotImplementedError

    def connect_to(self, suffix=""):
        d = connection.connect(reactor, self.address() + suffix)

        def connected(client):
            self.addCleanup(self._hang_up, client)
            return client
        return d.addCallback(connected)

    @defer.inlineCallbacks
    def test_fuzz(self):
        started = reactor.seconds()
        cases = self.cases()
        expectations = [expect_connection(items, finalizer, self.transport, encoding)
                        for items, finalizer, encoding in cases]
        self.assertNotIn(None, expectations)
        witness = witness_audio()
        expected_witness = witness_expected(self.engine)

        fuzzed = []
        for _, _, encoding in cases:
            fuzzed.append((yield self.connect_to(self.url_suffix(encoding))))
        shadows = []
        for _ in cases:
            shadows.append((yield self.connect_to(self.url_suffix("f32"))))
        watcher = yield self.connect_to()
        everyone = fuzzed + shadows + [watcher]
        for c in everyone:
            hello = yield c.next()
            self.assertEqual(hello["type"], "hello")

        # The shadows send all their audio at once; the fuzzed connections
        # send a message each in turn, the witness a piece now and then.
        for shadow, (_, audio, _) in zip(shadows, expectations):
            self.send_shadow_audio(shadow, audio)
        pieces = [witness[i:i + 1600] for i in range(0, len(witness), 1600)]
        longest = max(len(items) for items, _, _ in cases)
        pending = [[] for _ in cases]
        for i in range(longest):
            if i % 3 == 0 and pieces:
                self.send_witness(watcher, pieces.pop(0))
            for client, (items, _, _), rest in zip(fuzzed, cases, pending):
                if i < len(items):
                    rest.extend(self.send_item(client, items[i]))
            yield task.deferLater(reactor, 0, lambda: None)
            for client, rest in zip(fuzzed, pending):
                for late in rest:
                    late()
                del rest[:]
        for piece in pieces:
            self.send_witness(watcher, piece)
        watcher.close()
        for client, (_, finalizer, _) in zip(fuzzed, cases):
            self.send_item(client, self.finalizer_item(finalizer))

        # The server ends every connection once its final result is sent.
        ended = yield settle(lambda: all(c.closed.called for c in everyone))
        if not ended:
            self.fail("connections still open: %s" % "; ".join(
                "%s (last message %r)" % (name, c.messages[-1:])
                for name, c in self.named(fuzzed, shadows, watcher)
                if not c.closed.called))

        # Each ends with its final result.
        for name, c in self.named(fuzzed, shadows, watcher):
            results = c.results()
            self.assertTrue(results and results[-1]["is_final"],
                            "%s ended without a final result; its last messages: %r"
                            % (name, c.messages[-3:]))

        counts = {"messages": 0, "errors": 0, "f32 refusals": 0, "pongs": 0, "audio": 0,
                  "binary": 0, "samples": 0}
        for n, (client, shadow, case, expected) in enumerate(zip(
                fuzzed, shadows, cases, expectations)):
            replies, audio, outcomes = expected
            self.check_connection(n, client, case, replies, outcomes)
            self.assertEqual(shadow.errors(), [], "shadow %d" % (n,))
            tokens = self.assertResultsConsistent(client)
            self.assertEqual(tokens, self.assertResultsConsistent(shadow),
                             "connection %d decoded otherwise than its shadow" % (n,))
            covered = round(len(audio) * 1000 / RATE, 3)
            self.assertEqual(client.messages[-1]["audio_ms"], covered, n)
            self.assertEqual(shadow.messages[-1]["audio_ms"], covered, n)
            counts["messages"] += len(outcomes) + 1
            counts["errors"] += sum(1 for r in replies if r[0] == "error")
            counts["f32 refusals"] += sum(1 for o in outcomes if o.message is not None)
            counts["pongs"] += sum(1 for r in replies if r[0] == "pong")
            counts["audio"] += sum(1 for o in outcomes if o.kind == "audio")
            counts["binary"] += sum(1 for kind, _ in case[0] if kind == "binary")
            counts["samples"] += len(audio)
        self.assertEqual(watcher.errors(), [])
        self.assertEqual(self.assertResultsConsistent(watcher), expected_witness)

        # Nothing is left behind, and the server still answers.
        yield wait_for(lambda: len(self.server.registry) == 0)
        assert_engine_idle(self, self.engine)
        self.assertEqual((yield self.status())["connected_streams"], 0)
        fresh = yield self.connect_to()
        yield fresh.next()
        fresh.send({"type": "ping"})
        yield fresh.next(lambda m: m["type"] == "pong")
        fresh.close()
        final = yield fresh.final()
        self.assertEqual(final["token_ids"], [])
        yield fresh.closed
        yield wait_for(lambda: len(self.server.registry) == 0)
        assert_engine_idle(self, self.engine)
        report("%s: %d connections, %d messages (%d binary): %d errors (%d of them f32 "
               "samples refused), %d pongs, %d audio messages, %.2f s of audio accepted; "
               "witness and shadows agree; %d model steps, %.1f s; seed %d" % (
                   self.transport, len(cases), counts["messages"], counts["binary"],
                   counts["errors"], counts["f32 refusals"], counts["pongs"],
                   counts["audio"], counts["samples"] / RATE,
                   self.server.getServiceNamed("decoder").steps,
                   reactor.seconds() - started, SEED))
        report("%s: cases digest %s" % (self.transport, hashlib.sha1(
            repr([(items, finalizer, encoding) for items, finalizer, encoding in cases]
                 ).encode()).hexdigest()[:12]))

    def named(self, fuzzed, shadows, watcher):
        return ([("connection %d" % i, c) for i, c in enumerate(fuzzed)]
                + [("shadow %d" % i, c) for i, c in enumerate(shadows)]
                + [("witness", watcher)])

    def check_connection(self, n, client, case, replies, outcomes):
        """The replies to connection n's messages are exactly the model's."""
        self.assertEqual(client.messages[0]["type"], "hello")
        got = [m for m in client.messages[1:] if m.get("type") != "result"]
        for m in got:
            if m.get("type") == "error":
                self.assertEqual(set(m), {"type", "message"})
                self.assertIsInstance(m["message"], str)
                self.assertTrue(m["message"].strip(), m)
        actual = [("error", "message too large" in m["message"]) if m["type"] == "error"
                  else (m["type"], None) for m in got]
        if actual != replies:
            self.fail(self.explain(n, case, outcomes, actual, got))
        # Where the model fixes the error's text (refused f32 samples), it is exact.
        for m, outcome in zip(got, [o for o in outcomes if o.reply is not None]):
            if outcome.message is not None:
                self.assertEqual(m["message"], outcome.message, "connection %d" % (n,))

    def explain(self, n, case, outcomes, actual, got):
        lines = ["connection %d: the replies differ from the model's" % (n,)]
        for i, (a, b) in enumerate(zip(actual, [o.reply for o in outcomes if o.reply])):
            if a != b:
                lines.append("first difference at reply %d: got %r (%r), expected %r"
                             % (i, a, got[i], b))
                break
        else:
            lines.append("got %d replies, expected %d" % (
                len(actual), sum(1 for o in outcomes if o.reply)))
        messages_sent = self.sent_messages(case)
        for raw, outcome in zip(messages_sent, outcomes):
            lines.append("  %-8s %s" % (outcome.kind + ("/large" if outcome.too_large
                                                         else ""), describe(raw)))
        return "\n".join(lines)


class TCPFuzzTests(SocketFuzzMixin, unittest.TestCase):
    """Fuzzed lines over TCP, some written in two pieces, some ending in "\\r\\n"."""

    transport = "tcp"

    def url_suffix(self, encoding):
        return ""

    def cases(self):
        drawn = draw_examples(tcp_connections, CONNECTIONS)
        drawn[0] = (drawn[0][0] + tcp_landmarks(), drawn[0][1])
        return [(items, finalizer, "pcm16") for items, finalizer in drawn]

    def sent_messages(self, case):
        return tcp_lines([chunk for chunk, _ in case[0]])

    def finalizer_item(self, finalizer):
        return (finalizer, None)

    def send_item(self, client, item):
        chunk, split = item
        transport = client._proto.transport
        if split is None:
            transport.write(chunk)
            return []
        transport.write(chunk[:split])
        return [lambda: transport.write(chunk[split:])]

    def send_witness(self, client, piece):
        client.send_audio(piece)

    def send_shadow_audio(self, shadow, audio):
        for start in range(0, len(audio), 16000):
            shadow.send_audio(audio[start:start + 16000], encoding="f32")
        shadow.send({"type": "audio", "final": True})


class WebSocketFuzzTests(SocketFuzzMixin, unittest.TestCase):
    """Fuzzed text and binary WebSocket messages, on pcm16 and f32 connections."""

    transport = "ws"

    def url_suffix(self, encoding):
        return "/?encoding=%s" % (encoding,)

    def cases(self):
        drawn = draw_examples(ws_connections, CONNECTIONS)
        drawn[0] = (drawn[0][0] + ws_text_landmarks(), drawn[0][1], drawn[0][2])
        # The binary landmarks go to an f32 connection if there is one (a
        # message at the limit holds half as many samples as in pcm16).
        n = next((i for i, case in enumerate(drawn) if i and case[2] == "f32"), 1)
        items, finalizer, encoding = drawn[n]
        drawn[n] = (items + ws_binary_landmarks(encoding), finalizer, encoding)
        return drawn

    def sent_messages(self, case):
        return [raw for _, raw in case[0]]

    def finalizer_item(self, finalizer):
        return ("text", finalizer)

    def send_item(self, client, item):
        kind, raw = item
        client._proto.sendMessage(raw, isBinary=kind == "binary")
        return []

    def send_witness(self, client, piece):
        client._proto.sendMessage(encode_samples(piece, "pcm16"), isBinary=True)

    def send_shadow_audio(self, shadow, audio):
        for start in range(0, len(audio), 16000):
            shadow._proto.sendMessage(encode_samples(audio[start:start + 16000], "f32"),
                                      isBinary=True)
        shadow.close()


class OutOfRangeSamplesTests(ServerTestMixin, unittest.TestCase):
    """f32 samples past F32_LIMIT are refused, message by message, before
    they reach the model.

    Finite f32 samples large enough (noise around 1e18, one sample near
    1e38) overflow float32 in the featurizer's power spectrum and turn the
    log-mel features NaN.  In a stream's first chunk that made the model
    step raise (NeMo refusing a negative confidence), and DecodeLoop then
    ended every stream of the batch with "decoding failed"; later in a
    stream, the NaN stayed in its encoder cache and every result after it
    carried confidences outside [0, 1].  These tests send such samples and
    check that only the message holding them is refused, with the exact
    error, that the stream they were sent on goes on, and that nothing else
    is touched.
    """

    transport = "tcp"

    @defer.inlineCallbacks
    def test_huge_f32_samples_are_refused_and_spare_other_streams(self):
        self.start_server()
        audio = quantized(speechlike(77, 2.0))
        after = quantized(speechlike(79, 0.6)).astype(np.float32)
        bystander = yield self.connect()
        sender = yield self.connect()
        yield bystander.next()
        yield sender.next()
        for start in range(0, len(audio), 1600):
            bystander.send_audio(audio[start:start + 1600])
        # Once the bystander is being decoded, the samples arrive, as the
        # sender's first audio, while the bystander has many chunks to go.
        yield bystander.next(lambda m: m["type"] == "result")
        sender.send_audio(np.full(16000, 1e20, np.float32), encoding="f32")
        refusal = yield sender.next(lambda m: m["type"] == "error")
        self.assertEqual(refusal["message"],
                         "f32 audio must lie in [-1, 1]: got a sample of magnitude 1e+20")
        # The stream goes on with the audio sent after the refused message.
        sender.send_audio(after[:4000], encoding="f32")
        sender.send_audio(after[4000:], encoding="f32")
        sender.close()
        bystander.close()
        yield defer.gatherResults([bystander.closed, sender.closed])

        self.assertEqual(bystander.errors(), [])
        expected, _ = offline_tokens(self.engine, audio)
        self.assertEqual(self.assertResultsConsistent(bystander), expected)
        self.assertEqual(bystander.results()[-1]["audio_ms"], len(audio) * 1000 / RATE)
        self.assertEqual(sender.errors(), [refusal["message"]])
        expected, _ = offline_tokens(self.engine, after)
        self.assertEqual(self.assertResultsConsistent(sender), expected)
        self.assertEqual(sender.results()[-1]["audio_ms"], len(after) * 1000 / RATE)
        for client in (bystander, sender):
            self.assertConfidencesInRange(client)
        yield wait_for(lambda: len(self.server.registry) == 0)
        assert_engine_idle(self, self.engine)

    @defer.inlineCallbacks
    def test_huge_f32_sample_mid_stream_is_refused(self):
        # One sample of 1e38 after the stream's first chunk: the piece
        # holding it is refused, the pieces around it are decoded.
        self.start_server()
        audio = quantized(speechlike(78, 1.0)).astype(np.float32)
        audio[5000] = 1e38
        client = yield self.connect()
        yield client.next()
        kept = []
        for start in range(0, len(audio), 1600):
            piece = audio[start:start + 1600]
            client.send_audio(piece, encoding="f32", final=start + 1600 >= len(audio))
            if start != 4800:
                kept.append(piece)
        yield client.closed
        self.assertEqual(client.errors(), [
            "f32 audio must lie in [-1, 1]: got a sample of magnitude 1e+38"])
        kept = np.concatenate(kept)
        expected, _ = offline_tokens(self.engine, kept)
        self.assertEqual(self.assertResultsConsistent(client), expected)
        self.assertEqual(client.results()[-1]["audio_ms"], len(kept) * 1000 / RATE)
        self.assertConfidencesInRange(client)
        yield wait_for(lambda: len(self.server.registry) == 0)
        assert_engine_idle(self, self.engine)

    @defer.inlineCallbacks
    def test_f32_samples_up_to_the_limit_are_decoded(self):
        # Samples up to F32_LIMIT in magnitude are accepted (over [-1, 1]
        # but not absurdly), and decode with every confidence in [0, 1].
        self.start_server()
        audio = (quantized(speechlike(80, 1.0)) * F32_LIMIT).astype(np.float32)
        audio[100] = F32_LIMIT
        audio[200] = -F32_LIMIT
        client = yield self.connect()
        yield client.next()
        for start in range(0, len(audio), 1600):
            client.send_audio(audio[start:start + 1600], encoding="f32",
                              final=start + 1600 >= len(audio))
        yield client.closed
        self.assertEqual(client.errors(), [])
        expected, _ = offline_tokens(self.engine, audio)
        self.assertEqual(self.assertResultsConsistent(client), expected)
        self.assertEqual(client.results()[-1]["audio_ms"], len(audio) * 1000 / RATE)
        self.assertConfidencesInRange(client)
        yield wait_for(lambda: len(self.server.registry) == 0)
        assert_engine_idle(self, self.engine)

    def assertConfidencesInRange(self, client):
        confidences = [c for r in client.results() for c in r["confidence_scores"]]
        outside = [c for c in confidences if not 0.0 <= c <= 1.0]
        self.assertEqual(len(outside), 0, "%d of %d confidences outside [0, 1], as %r"
                         % (len(outside), len(confidences), outside[:1]))
