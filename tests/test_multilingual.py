"""
A multilingual model (``--model-size multilingual``, Nemotron 3.5 ASR): its
random-weight replica loads through the served path; each stream decodes
under its own language's prompt, batched with streams in other languages,
exactly as it would alone and as offline decoding of the same audio; the
server names the languages it takes, and refuses others with a clear error.
"""

from twisted.internet import defer, reactor, threads
from twisted.trial import unittest

from parakeet.clients import connection
from parakeet.clients.audiofiles import calibration_audio
from parakeet.contract import ChunkCutter
from parakeet.engine.engine import Engine

from .support.models import assert_engine_idle, tiny_model_path, write_wav
from .support.servers import ServerTestMixin

_engine = []


def multilingual_engine():
    """The tiny multilingual replica, loaded once for the run."""
    if not _engine:
        _engine.append(Engine.load(tiny_model_path("tiny-multilingual"), device="cpu",
                                   vad=False))
    return _engine[0]


def decode(engine, audios, languages, change=None):
    """Streams decoded together, each under its language: their tokens.
    change: (stream, chunks, language), the stream's language changed once
    that many of its chunks have been decoded."""
    cutters = []
    for i, (audio, language) in enumerate(zip(audios, languages)):
        cutter = ChunkCutter(700 + i, engine.geometry)
        if language is not None:
            cutter.language = language
        cutter.push(audio)
        cutter.finish()
        cutters.append(cutter)
    tokens = [[] for _ in audios]
    steps = 0
    while True:
        if change is not None and steps == change[1]:
            cutters[change[0]].language = change[2]
        chunks = [c for c in (cutter.next_chunk() for cutter in cutters) if c is not None]
        if not chunks:
            return tokens
        for result in engine.step(chunks):
            tokens[result.stream_id - 700] += result.token_ids
        steps += 1


class EngineTests(unittest.TestCase):

    def setUp(self):
        self.engine = multilingual_engine()
        self.audio = [calibration_audio(seed, 3.0) for seed in range(3)]

    def tearDown(self):
        assert_engine_idle(self, self.engine)

    def test_what_it_offers(self):
        engine = self.engine
        self.assertEqual(type(engine.pipeline.asr_model.asr_model).__name__,
                         "EncDecRNNTBPEModelWithPrompt")
        self.assertIn("de-DE", engine.languages)
        self.assertIn("ja-JP", engine.languages)
        self.assertEqual(engine.default_language, "auto")
        self.assertEqual(engine.chunk_sizes_ms, (80, 320, 560, 1120))
        self.assertEqual(engine.geometry.chunk_seconds, 0.32)
        self.assertRaisesRegex(ValueError, "trained for 80, 320, 560, 1120 ms", Engine.load,
                               tiny_model_path("tiny-multilingual"), device="cpu", chunk_ms=160,
                               vad=False)

    def test_streaming_equals_offline_in_each_language(self):
        heard = {}
        for language in ("en-US", "de-DE", "auto"):
            streamed = decode(self.engine, self.audio[:1], [language])[0]
            self.assertEqual(streamed, self.engine.decode_offline(self.audio[0], language)[0])
            heard[language] = streamed
        # The prompt is applied: the languages' tokens differ.
        self.assertEqual(len(set(map(tuple, heard.values()))), 3)
        self.assertEqual(decode(self.engine, self.audio[:1], [None])[0], heard["auto"])

    def test_languages_batched_together(self):
        """Streams of three languages in one batch each get exactly what
        they get alone."""
        languages = ["en-US", "de-DE", "fr-FR"]
        alone = [decode(self.engine, [audio], [language])[0]
                 for audio, language in zip(self.audio, languages)]
        self.assertEqual(decode(self.engine, self.audio, languages), alone)
        self.assertEqual(decode(self.engine, self.audio[::-1], languages[::-1]), alone[::-1])

    def test_language_changed_mid_stream(self):
        """From the chunk after the change, in the new language: neither
        what the stream gets in the first language nor in the second."""
        audio = self.audio[1:2]
        english = decode(self.engine, audio, ["en-US"])[0]
        german = decode(self.engine, audio, ["de-DE"])[0]
        changed = decode(self.engine, audio, ["en-US"], change=(0, 2, "de-DE"))[0]
        self.assertNotEqual(changed, english)
        self.assertNotEqual(changed, german)


class ServedTests(ServerTestMixin, unittest.TestCase):

    @defer.inlineCallbacks
    def connect(self):
        client = yield connection.connect(
            reactor, "ws://127.0.0.1:%d" % self.ports["WebSocket clients"])
        hello = yield client.next(lambda m: m["type"] == "hello")
        return client, hello

    @defer.inlineCallbacks
    def test_languages(self):
        self.start_server("--http-port", "0", "--language", "de-DE",
                          engine=multilingual_engine())
        client, hello = yield self.connect()
        info = hello["model_info"]
        self.assertEqual(info["name"], "tiny-multilingual-replica.nemo")
        self.assertEqual((info["chunk_ms"], info["chunk_sizes_ms"]), (320, [80, 320, 560, 1120]))
        self.assertIn("fr-FR", info["languages"])
        client.send({"type": "config", "language": "klingon"})
        client.send({"type": "config", "language": "FR-fr"})
        audio = calibration_audio(1, 2.0)
        client.send_audio(audio, final=True)
        final = yield client.final()
        yield client.closed
        [error] = client.errors()
        self.assertIn("language 'klingon': this server's model takes ar, ar-AR, auto,", error)
        self.assertTrue(final["is_final"])
        self.assertEqual([t for m in client.results() for t in m["token_ids"]],
                         decode(multilingual_engine(), [audio], ["fr-FR"])[0])

        # The other APIs' language parameters are checked the same way.
        path = self.mktemp()
        write_wav(path, audio, 16000)
        with open(path, "rb") as f:
            wav = f.read()
        port = self.server.getServiceNamed("HTTP").port.getHost().port
        status, body = yield threads.deferToThread(
            post, port, "/v1/listen?language=tlh", wav, "audio/wav")
        self.assertEqual(status, 400)
        self.assertIn("language 'tlh'", body)
        status, body = yield threads.deferToThread(
            post, port, "/v1/listen?language=multi", wav, "audio/wav")
        self.assertEqual(status, 200)

    @defer.inlineCallbacks
    def test_an_english_model_refuses_other_languages(self):
        self.start_server()
        client, hello = yield self.connect()
        self.assertEqual(hello["model_info"]["languages"], ["en"])
        client.send({"type": "config", "language": "en-GB"})
        client.send({"type": "config", "language": "de"})
        client.send({"type": "close"})
        yield client.closed
        self.assertEqual(client.errors(), [
            "config: language 'de': this server's model transcribes English only; "
            "the config was ignored"])


def post(port, path, body, content_type):
    """(status, body text) of a POST on loopback."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request("http://127.0.0.1:%d%s" % (port, path), data=body,
                                     headers={"content-type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read().decode("utf-8")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode("utf-8")

