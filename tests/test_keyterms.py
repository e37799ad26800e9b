"""
Key terms: phrases a stream's decoding favours (``config`` ``keyterms``,
``serve --keyterms FILE``, Deepgram's ``keyterm``), each stream in a
boosting tree of its own in NeMo's batched greedy decoder: one stream's
terms never change another's tokens.
"""

import threading
import warnings

import numpy as np
from twisted.internet import defer, reactor
from twisted.python import usage
from twisted.trial import unittest

from parakeet.audio import encode_samples
from parakeet.clients import connection
from parakeet.contract import ChunkCutter
from parakeet.server import messages, tap

from .support.apiclients import deepgram_client, need_clients, openai_client, wav_bytes
from .support.models import (
    HELDOUT, HELDOUT_ENGINES, OUT_OF_TEMPLATE, assert_engine_idle, demo_engine, heldout_clips)
from .support.servers import ServerTestMixin

#: A held-out clip the demo model mishears, and a key term that mends it:
#: "set an alarm for three thirty one" is heard as "... three thirty am".
CLIP, TERM, HEARD, SAID = 1, "three thirty one", "three thirty am", "three thirty one"


def biasing_models(engine):
    """The boosting trees the decoder holds."""
    store = engine.pipeline.biasing_store
    return store.num_models - len(store.free_ids)


class CheckTests(unittest.TestCase):

    def test_keyterms(self):
        self.assertEqual(messages.check_keyterms(["  Dr  Okafor ", "zurich", "o'brien"]),
                         ("dr okafor", "zurich", "o'brien"))
        for bad, says in [("zurich", "a list of strings"), ([1], "a list of strings"),
                          (["x"] * 101, "at most 100"), ([""], "1 to 50"),
                          (["a" * 51], "1 to 50"), (["room 101"], "numbers as words")]:
            with self.assertRaisesRegex(messages.ProtocolError, says):
                messages.check_keyterms(bad)
        config = messages.parse(b'{"type": "config", "keyterms": ["Zurich"]}')
        self.assertEqual(config.keyterms, ("zurich",))

    def test_server_file(self):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("# names\nZurich\n\nDr Okafor\n")
        options = tap.Options()
        options.parseOptions(["--keyterms", path])
        self.assertEqual(options.keyterms, ("zurich", "dr okafor"))
        with open(path, "w") as f:
            f.write("room 101\n")
        self.assertRaisesRegex(usage.UsageError, "--keyterms: keyterm 'room 101'",
                               tap.Options().parseOptions, ["--keyterms", path])
        self.assertRaisesRegex(usage.UsageError, "--keyterms: cannot read",
                               tap.Options().parseOptions, ["--keyterms", path + ".no"])


class EngineTests(unittest.TestCase):

    def setUp(self):
        self.engine = demo_engine()

    def tearDown(self):
        assert_engine_idle(self, self.engine)
        self.assertEqual(biasing_models(self.engine), 0)

    def decode(self, audios, keyterms, changes=None):
        """Streams decoded together, each with its key terms: their texts.
        changes: {stream: (samples, key terms)}, the stream's key terms
        replaced once that much of its audio has been decoded."""
        changes = dict(changes or {})
        cutters = []
        for i, (audio, terms) in enumerate(zip(audios, keyterms)):
            cutter = ChunkCutter(500 + i, self.engine.geometry)
            cutter.keyterms = tuple(terms)
            cutter.push(audio)
            cutter.finish()
            cutters.append(cutter)
        tokens = [[] for _ in audios]
        while True:
            for i, (at, terms) in list(changes.items()):
                if cutters[i].frames_done * self.engine.geometry.hop >= at:
                    cutters[i].keyterms = terms
                    del changes[i]
            chunks = [c for c in (cutter.next_chunk() for cutter in cutters) if c is not None]
            if not chunks:
                break
            for result in self.engine.step(chunks):
                tokens[result.stream_id - 500] += result.token_ids
        return [self.engine.text_of(t).strip() for t in tokens]

    def test_one_streams_terms_change_only_its_tokens(self):
        clips = heldout_clips()
        audio = clips[CLIP][0]
        others = [a for a, _, _ in clips[2:6]]
        plain = self.decode([audio] + others, [()] * 5)
        self.assertIn(HEARD, plain[0])
        boosted = self.decode([audio, audio] + others, [(TERM, "wednesday")] + [()] * 5)
        self.assertIn(SAID, boosted[0])
        self.assertEqual(boosted[1:], [plain[0]] + plain[1:])

    def test_misheard_words_and_false_alarms(self):
        """The test clips' words the model misses (four letters or more),
        given as each clip's key terms: some are heard then (6 of 36 when
        measured, at weight 1); given to the next clip instead, where they
        were not said, they appear where the model did not hear them
        before at most twice (0 measured)."""
        clips = [clip for folder in (HELDOUT, HELDOUT_ENGINES, OUT_OF_TEMPLATE)
                 for clip in heldout_clips(folder)]

        def decode(terms):
            texts = []
            for i in range(0, len(clips), 16):
                texts += self.decode([a for a, _, _ in clips[i:i + 16]], terms[i:i + 16])
            return [text.split() for text in texts]

        plain = decode([()] * len(clips))
        refs = [text.split() for _, text, _ in clips]
        missed = [sorted({w for w in ref if len(w) >= 4 and w not in heard})
                  for ref, heard in zip(refs, plain)]
        boosted = decode(missed)
        mended = sum(w in heard for words, heard in zip(missed, boosted) for w in words)
        self.assertGreaterEqual(sum(map(len, missed)), 20)
        self.assertGreaterEqual(mended, 4)
        others = missed[1:] + missed[:1]
        alarms = sum(w in heard and w not in ref and w not in before
                     for words, heard, ref, before in zip(others, decode(others), refs, plain)
                     for w in words)
        self.assertLessEqual(alarms, 2)

    def test_terms_replaced_mid_stream(self):
        """Key terms given, replaced or cleared after the first audio act on
        what is decoded after them, and only on their own stream."""
        clips = heldout_clips()
        first, audio = clips[3][0], clips[CLIP][0]
        both = np.concatenate([first, audio])
        others = [a for a, _, _ in clips[4:6]]
        plain = self.decode([both] + others, [()] * 3)
        self.assertNotIn(SAID, plain[0])
        at = len(first)
        given, replaced, cleared, *rest = self.decode(
            [both, both, both] + others, [(), ("zurich",), (TERM,)] + [()] * 2,
            {0: (at, (TERM,)), 1: (at, (TERM, "wednesday")), 2: (at, ())})
        self.assertIn(SAID, given)
        self.assertIn(SAID, replaced)
        self.assertNotIn(SAID, cleared)
        self.assertEqual(rest, plain[1:])
        self.assertEqual(biasing_models(self.engine), 0)

    def test_abort_forgets_the_terms(self):
        cutter = ChunkCutter(600, self.engine.geometry)
        cutter.keyterms = (TERM,)
        cutter.push(heldout_clips()[CLIP][0])
        self.engine.step([cutter.next_chunk()])
        self.assertEqual(biasing_models(self.engine), 1)
        self.engine.abort([600])


class ServedTests(ServerTestMixin, unittest.TestCase):

    @defer.inlineCallbacks
    def stream(self, audio, config=None):
        client = yield connection.connect(
            reactor, "ws://127.0.0.1:%d" % self.ports["WebSocket clients"])
        yield client.next(lambda m: m["type"] == "hello")
        if config:
            client.send(dict(config, type="config"))
        for start in range(0, len(audio), 1600):
            client.send_audio(audio[start:start + 1600], final=start + 1600 >= len(audio))
        final = yield client.final()
        yield client.closed
        return final["text"], client.errors()

    @defer.inlineCallbacks
    def test_config(self):
        self.start_server(engine=demo_engine())
        audio = heldout_clips()[CLIP][0]
        boosted, boosted_errors = yield self.stream(audio, {"keyterms": ["Three Thirty One"]})
        plain, _ = yield self.stream(audio)
        self.assertEqual(boosted_errors, [])
        self.assertIn(SAID, boosted)
        self.assertIn(HEARD, plain)

    @defer.inlineCallbacks
    def test_server_terms(self):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(TERM + "\n")
        self.start_server("--keyterms", path, engine=demo_engine())
        text, _ = yield self.stream(heldout_clips()[CLIP][0])
        self.assertIn(SAID, text)

    @defer.inlineCallbacks
    def test_config_mid_stream(self):
        """Key terms sent after audio act on what follows them."""
        self.start_server(engine=demo_engine())
        clips = heldout_clips()
        first, audio = clips[3][0], clips[CLIP][0]
        client = yield connection.connect(
            reactor, "ws://127.0.0.1:%d" % self.ports["WebSocket clients"])
        yield client.next(lambda m: m["type"] == "hello")
        client.send_audio(first)
        yield client.next(lambda m: m.get("turn_detection") == "end_of_utterance")
        client.send({"type": "config", "keyterms": ["Three Thirty One"]})
        client.send_audio(audio, final=True)
        final = yield client.final()
        yield client.closed
        self.assertEqual(client.errors(), [])
        self.assertIn(SAID, final["text"])

    def http_server(self):
        """The HTTP port of a server for the other APIs' clients."""
        need_clients()
        self.start_server("--http-port", "0", engine=demo_engine())
        return self.server.getServiceNamed("HTTP").port.getHost().port

    @defer.inlineCallbacks
    def assertMended(self, heard, **boost):
        """heard(**options): the clip's text as a client gets it (called off
        the reactor thread); with boost, the key term is heard in it, and
        without, the model's usual mishearing."""
        from twisted.internet import threads

        boosted = yield threads.deferToThread(heard, **boost)
        plain = yield threads.deferToThread(heard)
        self.assertIn(SAID, boosted)
        self.assertIn(HEARD, plain)

    def test_deepgram_keyterm(self):
        dg = deepgram_client(self, self.http_server())
        wav = wav_bytes(heldout_clips()[CLIP][0])

        def heard(**options):
            return (dg.listen.v1.media.transcribe_file(request=wav, **options)
                    .results.channels[0].alternatives[0].transcript)

        return self.assertMended(heard, keyterm=["three thirty one"])

    @defer.inlineCallbacks
    def test_deepgram_configure(self):
        """Deepgram's Configure replaces a live stream's keyterms and is
        answered; one over the limits is refused and changes nothing."""
        dg = deepgram_client(self, self.http_server())
        clips = heldout_clips()
        first, audio = encode_samples(clips[3][0]), encode_samples(clips[CLIP][0])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            from deepgram.core.events import EventType
            from deepgram.listen.v1.types import ListenV1Configure

        def run():
            got = []
            with dg.listen.v1.connect(model="nova-3", encoding="linear16", sample_rate=16000,
                                      channels=1) as sock:
                sock.on(EventType.MESSAGE, got.append)
                listener = threading.Thread(target=sock.start_listening, daemon=True)
                listener.start()
                sock.send_media(first)
                sock.send_configure(ListenV1Configure(keyterms=["x"] * 101))
                sock.send_configure(ListenV1Configure(keyterms=[SAID],
                                                      features={"numerals": False}))
                sock.send_media(audio)
                sock.send_close_stream()
                listener.join(60)
            return got

        from twisted.internet import threads

        got = yield threads.deferToThread(run)
        failure, success = [m for m in got if m.type.startswith("Configure")]
        self.assertEqual((failure.type, failure.code),
                         ("ConfigureFailure", "CONFIGURE_KEYTERM_LIMIT_EXCEEDED"))
        self.assertIn("at most 100", failure.description)
        self.assertEqual((success.type, success.keyterms), ("ConfigureSuccess", [SAID]))
        self.assertEqual(success.request_id, got[-1].request_id)
        heard = " ".join(m.channel.alternatives[0].transcript for m in got
                         if m.type == "Results")
        self.assertIn(SAID, heard)

    def test_openai_prompt(self):
        client = openai_client(self, self.http_server())
        wav = wav_bytes(heldout_clips()[CLIP][0])

        def heard(**options):
            return client.audio.transcriptions.create(
                model="whisper-1", file=("x.wav", wav), **options).text

        return self.assertMended(heard,
                                 prompt="An alarm at three thirty one, for Zurich; 7 o'clock")
