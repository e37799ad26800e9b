"""
Key terms: phrases a stream's decoding favours (``config`` ``keyterms``,
``serve --keyterms FILE``, Deepgram's ``keyterm``), each stream in a
boosting tree of its own in NeMo's batched greedy decoder: one stream's
terms never change another's tokens.
"""

from twisted.internet import defer, reactor
from twisted.python import usage
from twisted.trial import unittest

from parakeet.clients import connection
from parakeet.contract import ChunkCutter
from parakeet.server import messages, tap

from .support.apiclients import deepgram_client, need_clients, openai_client, wav_bytes
from .support.models import assert_engine_idle, demo_engine, heldout_clips
from .support.servers import ServerTestMixin

#: A held-out clip the demo model mishears, and a key term that mends it:
#: "set an alarm for three thirty one" is heard as "... three twenty am".
CLIP, TERM, HEARD, SAID = 1, "three thirty one", "three twenty am", "three thirty one"


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

    def decode(self, audios, keyterms):
        """Streams decoded together, each with its key terms: their texts."""
        cutters = []
        for i, (audio, terms) in enumerate(zip(audios, keyterms)):
            cutter = ChunkCutter(500 + i, self.engine.geometry)
            cutter.keyterms = tuple(terms)
            cutter.push(audio)
            cutter.finish()
            cutters.append(cutter)
        tokens = [[] for _ in audios]
        while True:
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
    def test_server_terms_and_late_config(self):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(TERM + "\n")
        self.start_server("--keyterms", path, engine=demo_engine())
        audio = heldout_clips()[CLIP][0]
        text, _ = yield self.stream(audio)
        self.assertIn(SAID, text)
        # Too late once audio has come.
        client = yield connection.connect(
            reactor, "ws://127.0.0.1:%d" % self.ports["WebSocket clients"])
        yield client.next(lambda m: m["type"] == "hello")
        client.send_audio(audio[:1600])
        client.send({"type": "config", "keyterms": ["zurich"]})
        client.send_audio(audio[1600:], final=True)
        yield client.final()
        yield client.closed
        self.assertIn("before the first audio", client.errors()[0])

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

    def test_openai_prompt(self):
        client = openai_client(self, self.http_server())
        wav = wav_bytes(heldout_clips()[CLIP][0])

        def heard(**options):
            return client.audio.transcriptions.create(
                model="whisper-1", file=("x.wav", wav), **options).text

        return self.assertMended(heard,
                                 prompt="An alarm at three thirty one, for Zurich; 7 o'clock")
