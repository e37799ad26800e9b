"""
Inverse text normalisation (``serve --itn``): ended utterances in their
written form ("07:30", "29340"), the spoken form kept in ``spoken_text``,
each written word with the times of the spoken words it stands for; and a
stream turning it off.  The normaliser needs the ``itn`` extra
(nemo_text_processing); without it those tests are skipped.
"""


from twisted.internet import defer, reactor
from twisted.trial import unittest

from parakeet.clients import connection
from parakeet.engine.nemo.itn import unsupported_reason, written_words
from parakeet.training import corpus

from .support.apiclients import deepgram_client, need_clients, openai_client, wav_bytes
from .support.models import OUT_OF_TEMPLATE, demo_engine, heldout_clips
from .support.servers import ServerTestMixin

#: Bound on the word error rate of the written transcripts of 20 held-out
#: clips (16 digit strings, numbers and single words, 4 sentences) against
#: their written references (the references through the same normaliser).
#: Measured 0.66 (0.35 for the spoken forms against the spoken references:
#: a digit string is one written word, so one digit heard wrong makes the
#: whole string an error); the spoken forms against the written references
#: score 1.5.
WRITTEN_WER_BOUND = 0.75


def words(*spoken):
    """Spoken words with times: each 100 ms long, 200 ms apart."""
    return [{"word": w, "start_ms": 200 * i, "end_ms": 200 * i + 100, "confidence": 0.5 + i / 100}
            for i, w in enumerate(spoken)]


class WrittenWordsTests(unittest.TestCase):

    def test_spans_take_their_spoken_words_times(self):
        said = words("wake", "me", "at", "seven", "thirty")
        got = written_words(said, [w["word"] for w in said], ["wake", "me", "at", "07:30"],
                            [([0], [0], "name"), ([1], [1], "name"), ([2], [2], "name"),
                             ([3, 4], [3], "time")])
        self.assertEqual([w["word"] for w in got], ["wake", "me", "at", "07:30"])
        self.assertEqual(got[3], {"word": "07:30", "start_ms": 600, "end_ms": 900,
                                  "confidence": 0.535, "spoken": "seven thirty"})
        self.assertEqual(got[0], said[0])

    def test_a_span_of_several_written_words(self):
        said = words("seven", "thirty", "am")
        got = written_words(said, ["seven", "thirty", "am"], ["07:30", "a.m."],
                            [([0, 1, 2], [0, 1], "time")])
        self.assertEqual(got, [{"word": "07:30 a.m.", "start_ms": 0, "end_ms": 500,
                                "confidence": 0.51, "spoken": "seven thirty am"}])


class _Normalizer:

    def setUp(self):
        reason = unsupported_reason()
        if reason is not None:
            raise unittest.SkipTest(reason)


class NormalizerTests(_Normalizer, unittest.TestCase):

    def test_domain(self):
        from parakeet.engine.nemo.itn import Normalizer

        normalizer = Normalizer(self.mktemp())
        for spoken, written in [
                ("set an alarm for seven thirty in the morning",
                 "set an alarm for 07:30 in the morning"),
                ("my pin is two nine three four zero", "my pin is 29340"),
                ("eight hundred and ninety", "890"),
                ("half past six", "06:30"),
                ("call mom", "call mom"),
                ("", "")]:
            got = normalizer.utterance(words(*spoken.split()))
            self.assertEqual(" ".join(w["word"] for w in got), written)
        got = normalizer.utterance(words("two", "nine", "three", "four", "zero"))
        self.assertEqual((got[0]["start_ms"], got[0]["end_ms"]), (0, 900))


class ServedTests(_Normalizer, ServerTestMixin, unittest.TestCase):
    """--itn end to end, over both transports."""

    @defer.inlineCallbacks
    def stream(self, transport, audio, config=None):
        """The results of a stream of audio over transport."""
        address = ("tcp://127.0.0.1:%d" % self.ports["TCP clients"] if transport == "tcp"
                   else "ws://127.0.0.1:%d" % self.ports["WebSocket clients"])
        client = yield connection.connect(reactor, address)
        yield client.next(lambda m: m["type"] == "hello")
        if config:
            client.send(dict(config, type="config"))
        for start in range(0, len(audio), 1600):
            client.send_audio(audio[start:start + 1600], final=start + 1600 >= len(audio))
        yield client.final()
        yield client.closed
        return client

    @defer.inlineCallbacks
    def test_written_forms(self):
        self.start_server("--itn", engine=demo_engine())
        from parakeet.engine.nemo.itn import Normalizer

        normalizer = Normalizer()
        clips = heldout_clips(OUT_OF_TEMPLATE) + heldout_clips()[:4]
        pairs, spoken_pairs = [], []
        for i, (audio, text, _) in enumerate(clips):
            client = yield self.stream("tcp" if i % 2 else "websocket", audio)
            results = client.results()
            final = results[-1]
            utterances = [r["utterance"] for r in results
                          if r.get("utterance") and r["utterance"]["words"]]
            self.assertEqual(client.errors(), [])
            self.assertEqual(final["text"], " ".join(u["text"] for u in utterances))
            self.assertEqual(final["spoken_text"],
                             " ".join(u["spoken_text"] for u in utterances))
            for u in utterances:
                # Each written word spans the spoken words it stands for, and
                # the written form is the normaliser's of the spoken one.
                self.assertEqual(" ".join(w.get("spoken", w["word"]) for w in u["words"]),
                                 u["spoken_text"])
                for w in u["words"]:
                    self.assertLess(w["start_ms"], w["end_ms"])
                self.assertEqual(u["text"], " ".join(
                    w["word"] for w in normalizer.utterance(words(*u["spoken_text"].split()))))
            reference = " ".join(w["word"] for w in normalizer.utterance(words(*text.split())))
            pairs.append((reference, final["text"]))
            spoken_pairs.append((text, final["spoken_text"]))
        self.assertLessEqual(corpus.word_error_rate(pairs), WRITTEN_WER_BOUND,
                             list(zip(pairs, spoken_pairs)))
        # Digits were written as digits.
        self.assertTrue(any(ch.isdigit() for _, heard in pairs for ch in heard), pairs)

    @defer.inlineCallbacks
    def test_a_stream_turns_it_off(self):
        self.start_server("--itn", engine=demo_engine())
        audio = heldout_clips(OUT_OF_TEMPLATE)[0][0]
        written = yield self.stream("websocket", audio)
        spoken = yield self.stream("websocket", audio, {"itn": False})
        self.assertNotIn("spoken_text", spoken.results()[-1])
        self.assertEqual(spoken.results()[-1]["text"], written.results()[-1]["spoken_text"])
        # The tokens are the same either way.
        self.assertEqual([t for r in spoken.results() for t in r["token_ids"]],
                         [t for r in written.results() for t in r["token_ids"]])

    @defer.inlineCallbacks
    def test_without_itn_a_stream_cannot_ask_for_it(self):
        self.start_server(engine=demo_engine())
        client = yield self.stream("websocket", heldout_clips()[0][0], {"itn": True})
        self.assertIn("started without --itn", client.errors()[0])
        self.assertNotIn("spoken_text", client.results()[-1])


class OtherAPIsTests(_Normalizer, ServerTestMixin, unittest.TestCase):
    """Deepgram's smart_format and numerals ask for written forms; OpenAI's
    transcriptions get the server's default."""

    @defer.inlineCallbacks
    def test_deepgram_and_openai(self):
        from twisted.internet import threads

        need_clients()
        self.start_server("--itn", "--http-port", "0", engine=demo_engine())
        port = self.server.getServiceNamed("HTTP").port.getHost().port
        wav = wav_bytes(heldout_clips(OUT_OF_TEMPLATE)[0][0])
        dg, oa = deepgram_client(self, port), openai_client(self, port)

        def heard():
            said = [dg.listen.v1.media.transcribe_file(request=wav, **options)
                    .results.channels[0].alternatives[0].transcript
                    for options in ({}, {"smart_format": True}, {"numerals": True})]
            return said + [oa.audio.transcriptions.create(
                model="whisper-1", file=("x.wav", wav)).text]

        plain, smart, numerals, openai_text = yield threads.deferToThread(heard)
        self.assertFalse(any(ch.isdigit() for ch in plain), plain)
        self.assertTrue(any(ch.isdigit() for ch in smart), smart)
        self.assertEqual(numerals, smart)
        self.assertEqual(openai_text, smart)
