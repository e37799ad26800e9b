"""
OpenAI's and Deepgram's APIs (parakeet.server.apis), driven by their own
client libraries (``openai`` and ``deepgram-sdk``, pinned in setup.py's
``test`` extra) against a server on loopback serving the demo model: each
hears held-out clips as the native protocol does, in the API's own shapes.

The libraries block, so each client runs in a thread while the reactor
serves.
"""

import base64
import io
import threading
import warnings

import numpy as np
from twisted.internet import defer, reactor, threads
from twisted.trial import unittest

from parakeet.audio import encode_samples

from .support.apiclients import deepgram_client, need_clients, openai_client, wav_bytes
from .support.models import demo_engine, heldout_clips
from .support.servers import Scraped, ServerTestMixin, scrape, wait_for

TOKEN = "api-test-token"
#: Milliseconds of audio in each message a client sends.
PIECE_MS = 100


def pieces(data, size):
    return [data[i:i + size] for i in range(0, len(data), size)]


def conversation(clips, gap=1.0, rate=16000):
    """The clips one after another with gap seconds of silence between: one
    stream of several utterances."""
    silence = np.zeros(int(gap * rate), np.float32)
    return np.concatenate([part for audio, _, _ in clips for part in (audio, silence)])


class _APIServer(ServerTestMixin):
    """A server with --auth-tokens, whose one token the clients present."""

    #: --max-num-streams, if not the engine's.
    streams = None
    #: More flags for the server.
    flags = ()

    def setUp(self):
        need_clients()
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(TOKEN + "\n")
        flags = ["--http-port", "0", "--auth-tokens", path]
        if self.streams is not None:
            flags += ["--max-num-streams", str(self.streams)]
        flags += list(self.flags)
        self.start_server(*flags, engine=demo_engine())
        self.http = self.server.getServiceNamed("HTTP").port.getHost().port
        self.clips = heldout_clips()[:3]
        self.audio = conversation(self.clips)
        return self.native()

    @defer.inlineCallbacks
    def native(self):
        """self.heard: the utterances the native protocol hears in self.audio,
        and in its first clip alone."""
        from parakeet.clients import connection

        heard = []
        for audio in (self.audio, self.clips[0][0]):
            client = yield connection.connect(
                reactor, "ws://127.0.0.1:%d" % self.ports["WebSocket clients"], token=TOKEN)
            yield self.stream(client, audio)
            yield client.closed
            heard.append([r["utterance"]["text"] for r in client.results()
                          if r.get("utterance") and r["utterance"]["words"]])
        self.heard, self.heard_first = heard[0], " ".join(heard[1])
        self.assertEqual(len(self.heard), 3)

    def in_thread(self, f, *args):
        return threads.deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)

    def openai(self, **options):
        return openai_client(self, self.http, options.pop("api_key", TOKEN), **options)

    def deepgram(self, key=TOKEN):
        return deepgram_client(self, self.http, key)


class OpenAIRealtimeTests(_APIServer, unittest.TestCase):

    def realtime(self, session, audio=None, commit=False, api_key=TOKEN, until=None):
        """Events of a transcription session fed audio (16 kHz pcm16), until
        until(events) holds or the server closes."""
        audio = self.audio if audio is None else audio
        client = self.openai(api_key=api_key)
        until = until or (lambda events: False)

        def run():
            events = []
            with client.realtime.connect(extra_query={"intent": "transcription"}) as conn:
                conn.session.update(session=session)
                data = encode_samples(audio)
                for piece in pieces(data, 2 * 16 * PIECE_MS):
                    conn.input_audio_buffer.append(audio=base64.b64encode(piece).decode())
                if commit:
                    conn.input_audio_buffer.commit()
                for event in conn:
                    events.append(event)
                    if until(events):
                        break
            return events

        return self.in_thread(run)

    @defer.inlineCallbacks
    def test_server_vad(self):
        # Each utterance is an item: speech started, deltas, speech stopped,
        # committed, completed; the transcripts are the native words.
        events = yield self.realtime(
            {"type": "transcription",
             "audio": {"input": {"format": {"type": "audio/pcm", "rate": 16000},
                                 "turn_detection": {"type": "server_vad",
                                                    "silence_duration_ms": 300}}},
             "include": ["item.input_audio_transcription.logprobs"]},
            until=lambda events: sum(e.type.endswith(".completed") for e in events) == 3)
        types = [e.type for e in events]
        self.assertEqual(types[:2], ["session.created", "session.updated"])
        self.assertEqual(events[1].session.audio.input.format.rate, 16000)
        completed = [e for e in events if e.type.endswith("transcription.completed")]
        self.assertEqual([e.transcript for e in completed], self.heard)
        for item in completed:
            mine = [e for e in events if getattr(e, "item_id", None) == item.item_id]
            self.assertEqual([e.type for e in mine][0], "input_audio_buffer.speech_started")
            self.assertEqual([e.type for e in mine][-3:], [
                "input_audio_buffer.speech_stopped", "input_audio_buffer.committed",
                "conversation.item.input_audio_transcription.completed"])
            deltas = "".join(e.delta for e in mine if e.type.endswith(".delta"))
            self.assertEqual(deltas.strip(), item.transcript)
            self.assertEqual(len(item.logprobs), len(item.transcript.split()))
            self.assertGreater(item.usage.seconds, 0)
            self.assertLess(mine[0].audio_start_ms, mine[-3].audio_end_ms)

    @defer.inlineCallbacks
    def test_manual_commit(self):
        # Without turn detection one commit makes one item of everything.
        events = yield self.realtime(
            {"type": "transcription",
             "audio": {"input": {"format": {"type": "audio/pcm", "rate": 16000},
                                 "turn_detection": None}}},
            commit=True, until=lambda events: events[-1].type.endswith(".completed"))
        self.assertNotIn("input_audio_buffer.speech_started", [e.type for e in events])
        self.assertEqual(events[-1].transcript, " ".join(self.heard))

    @defer.inlineCallbacks
    def test_legacy_session_and_mulaw(self):
        # The beta API's transcription_session.update, with 8 kHz G.711 u-law.
        import soxr

        audio = soxr.resample(self.clips[0][0], 16000, 8000)
        client = self.openai()

        def run():
            events = []
            with client.realtime.connect(extra_query={"intent": "transcription"}) as conn:
                conn.send({"type": "transcription_session.update",
                           "session": {"input_audio_format": "g711_ulaw",
                                       "turn_detection": None}})
                for piece in pieces(encode_samples(audio, "mulaw"), 800):
                    conn.input_audio_buffer.append(audio=base64.b64encode(piece).decode())
                conn.input_audio_buffer.commit()
                for event in conn:
                    events.append(event)
                    if event.type.endswith(".completed"):
                        return events

        events = yield self.in_thread(run)
        self.assertEqual(events[1].type, "transcription_session.updated")
        self.assertEqual(events[-1].transcript.split()[:2], self.heard_first.split()[:2])

    @defer.inlineCallbacks
    def test_errors_keep_the_session(self):
        client = self.openai()

        def run():
            events = []
            with client.realtime.connect(extra_query={"intent": "transcription"}) as conn:
                conn.send({"type": "no.such.event", "event_id": "mine"})
                conn.input_audio_buffer.append(audio="not base64!")
                conn.input_audio_buffer.commit()
                conn.session.update(session={"type": "transcription", "audio": {
                    "input": {"transcription": {"language": "de"}}}})
                conn.session.update(session={"type": "transcription"})
                for event in conn:
                    events.append(event)
                    if event.type == "session.updated":
                        return events

        events = yield self.in_thread(run)
        errors = [e.error for e in events if e.type == "error"]
        self.assertEqual([e.code for e in errors],
                         ["invalid_type", "invalid_value", "input_audio_buffer_commit_empty",
                          "invalid_value"])
        self.assertEqual(errors[0].event_id, "mine")
        self.assertIn("no.such.event", errors[0].message)
        self.assertEqual(errors[3].param, "transcription.language")
        self.assertEqual(events[-1].type, "session.updated")


class OpenAIRealtimeRefusalTests(_APIServer, unittest.TestCase):

    streams = 1

    def until_closed(self, client):
        """(events, close code) of a Realtime session that only listens."""
        from websockets.exceptions import ConnectionClosedError

        events = []
        try:
            with client.realtime.connect(extra_query={"intent": "transcription"}) as conn:
                for event in conn:
                    events.append(event)
        except ConnectionClosedError as e:
            return events, e.rcvd.code
        return events, None

    @defer.inlineCallbacks
    def test_wrong_token(self):
        events, code = yield self.in_thread(self.until_closed, self.openai(api_key="wrong"))
        self.assertEqual(code, 1008)
        self.assertEqual([(e.type, e.error.code) for e in events], [("error", "invalid_api_key")])

    @defer.inlineCallbacks
    def test_full(self):
        client = self.openai()
        held = threading.Event()
        release = threading.Event()

        def hold():
            with client.realtime.connect(extra_query={"intent": "transcription"}) as conn:
                conn.recv()
                held.set()
                release.wait(30)

        def second():
            held.wait(30)
            try:
                return self.until_closed(client)
            finally:
                release.set()

        first = self.in_thread(hold)
        events, code = yield self.in_thread(second)
        yield first
        self.assertEqual(code, 1013)
        self.assertEqual([(e.type, e.error.code, e.error.type) for e in events],
                         [("error", "server_full", "server_error")])


class OpenAITranscriptionsTests(_APIServer, unittest.TestCase):

    def transcribe(self, **options):
        client = self.openai()
        wav = wav_bytes(self.audio)
        return self.in_thread(lambda: client.audio.transcriptions.create(
            file=("talk.wav", wav, "audio/wav"), model="whisper-1", **options))

    @defer.inlineCallbacks
    def test_json(self):
        result = yield self.transcribe()
        self.assertEqual(result.text, " ".join(self.heard))
        self.assertAlmostEqual(result.usage.seconds, len(self.audio) / 16000, delta=0.2)

    @defer.inlineCallbacks
    def test_flac(self):
        import soundfile

        flac = io.BytesIO()
        soundfile.write(flac, self.audio, 16000, format="FLAC")
        client = self.openai()
        result = yield self.in_thread(lambda: client.audio.transcriptions.create(
            file=("talk.flac", flac.getvalue()), model="whisper-1"))
        self.assertEqual(result.text, " ".join(self.heard))

    @defer.inlineCallbacks
    def test_verbose_json(self):
        result = yield self.transcribe(response_format="verbose_json",
                                       timestamp_granularities=["word", "segment"])
        self.assertEqual([s.text.strip() for s in result.segments], self.heard)
        self.assertEqual(" ".join(w.word for w in result.words), " ".join(self.heard))
        starts = [w.start for w in result.words]
        self.assertEqual(starts, sorted(starts))
        self.assertAlmostEqual(result.duration, len(self.audio) / 16000, delta=0.2)

    @defer.inlineCallbacks
    def test_text_srt_vtt(self):
        text = yield self.transcribe(response_format="text")
        self.assertEqual(text, " ".join(self.heard) + "\n")
        srt = yield self.transcribe(response_format="srt")
        blocks = srt.strip().split("\n\n")
        self.assertEqual([b.split("\n")[2] for b in blocks], self.heard)
        self.assertRegex(blocks[0].split("\n")[1], r"^00:00:\d\d,\d{3} --> 00:00:\d\d,\d{3}$")
        vtt = yield self.transcribe(response_format="vtt")
        self.assertTrue(vtt.startswith("WEBVTT\n\n"))
        self.assertEqual(vtt.count(" --> "), 3)

    @defer.inlineCallbacks
    def test_stream(self):
        client = self.openai()
        wav = wav_bytes(self.audio)

        def run():
            stream = client.audio.transcriptions.create(
                file=("talk.wav", wav), model="whisper-1", stream=True)
            return [(e.type, getattr(e, "delta", None) or getattr(e, "text", None))
                    for e in stream]

        events = yield self.in_thread(run)
        self.assertEqual(events[-1], ("transcript.text.done", " ".join(self.heard)))
        deltas = [text for kind, text in events[:-1]]
        self.assertEqual({kind for kind, _ in events[:-1]}, {"transcript.text.delta"})
        self.assertGreater(len(deltas), 3)
        self.assertEqual("".join(deltas), " ".join(self.heard))

    @defer.inlineCallbacks
    def test_bad_requests(self):
        import openai

        client = self.openai()
        cases = [
            (dict(file=("x.wav", b"not audio at all")), "file"),
            (dict(file=("x.wav", wav_bytes(self.audio)), response_format="diarized_json"),
             "response_format"),
            (dict(file=("x.wav", wav_bytes(self.audio)), language="fr"), "language"),
        ]
        for options, param in cases:
            try:
                yield self.in_thread(lambda: client.audio.transcriptions.create(
                    model="whisper-1", **options))
            except openai.BadRequestError as e:
                if param != "file":
                    self.assertEqual(e.param, param)
                else:
                    self.assertIn("cannot decode", e.message)
            else:
                self.fail("no error for %r" % (param,))
        bad = self.openai(api_key="wrong")
        try:
            yield self.in_thread(lambda: bad.audio.transcriptions.create(
                model="whisper-1", file=("x.wav", wav_bytes(self.audio))))
        except openai.AuthenticationError as e:
            self.assertEqual(e.code, "invalid_api_key")
        else:
            self.fail("a wrong token was accepted")



class DeepgramLiveTests(_APIServer, unittest.TestCase):

    def listen(self, audio=None, rate=16000, encoding="linear16", finalize=True, **options):
        """The messages of a live stream of audio sent in 100 ms pieces."""
        audio = self.audio if audio is None else audio
        client = self.deepgram()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            from deepgram.core.events import EventType

        def run():
            got = []
            with client.listen.v1.connect(model="nova-3", encoding=encoding,
                                          sample_rate=rate, channels=1, **options) as sock:
                sock.on(EventType.MESSAGE, got.append)
                listener = threading.Thread(target=sock.start_listening, daemon=True)
                listener.start()
                sock.send_keep_alive()
                data = encode_samples(audio, "mulaw" if encoding == "mulaw" else "pcm16")
                width = 1 if encoding == "mulaw" else 2
                for piece in pieces(data, width * rate * PIECE_MS // 1000):
                    sock.send_media(piece)
                if finalize:
                    sock.send_finalize()
                sock.send_close_stream()
                listener.join(60)
            return got

        return self.in_thread(run)

    @defer.inlineCallbacks
    def test_live(self):
        got = yield self.listen(interim_results=True, vad_events=True, utterance_end_ms=1000,
                                endpointing=300, punctuate=True, smart_format=True)
        types = [m.type for m in got]
        finals = [m for m in got if m.type == "Results" and m.is_final]
        said = [m.channel.alternatives[0].transcript for m in finals
                if m.channel.alternatives[0].transcript]
        self.assertEqual(said, self.heard)
        self.assertEqual([m.speech_final for m in finals if m.channel.alternatives[0].transcript],
                         [True] * 3)
        interim = [m for m in got if m.type == "Results" and not m.is_final]
        self.assertGreater(len(interim), 3)
        self.assertEqual(types.count("SpeechStarted"), 3)
        self.assertEqual(types.count("UtteranceEnd"), 3)
        self.assertEqual(types[-1], "Metadata")
        self.assertAlmostEqual(got[-1].duration, len(self.audio) / 16000, delta=0.2)
        # The finals tile the audio; words lie inside their result's span.
        for m in finals:
            words = m.channel.alternatives[0].words
            for w in words:
                self.assertTrue(m.start - 0.01 <= w.start <= w.end <= m.start + m.duration + 0.01)
        # The Finalize is answered.
        self.assertEqual([m.from_finalize for m in finals], [False] * 3 + [True])

    @defer.inlineCallbacks
    def test_finals_only_and_mulaw(self):
        import soxr

        audio = soxr.resample(self.audio, 16000, 8000)
        got = yield self.listen(audio, rate=8000, encoding="mulaw", finalize=False)
        self.assertEqual({m.type for m in got}, {"Results", "Metadata"})
        self.assertTrue(all(m.is_final for m in got if m.type == "Results"))
        heard = " ".join(m.channel.alternatives[0].transcript for m in got
                         if m.type == "Results")
        self.assertEqual(heard.split()[:2], self.heard[0].split()[:2])

    @defer.inlineCallbacks
    def test_refusals(self):
        from websockets.exceptions import InvalidStatus

        def status(**options):
            def run():
                try:
                    self.deepgram(options.pop("key", TOKEN)).listen.v1.connect(
                        model="nova-3", channels=1, **options).__enter__()
                except InvalidStatus as e:
                    return e.response.status_code
            return self.in_thread(run)

        self.assertEqual((yield status(key="wrong", encoding="linear16", sample_rate=16000)),
                         401)
        self.assertEqual((yield status(encoding="opus", sample_rate=16000)), 400)
        self.assertEqual((yield status(encoding="linear16")), 400)

    @defer.inlineCallbacks
    def test_prerecorded(self):
        client = self.deepgram()
        wav = wav_bytes(self.audio)
        response = yield self.in_thread(lambda: client.listen.v1.media.transcribe_file(
            request=wav, model="nova-3", utterances=True, punctuate=True))
        alternative = response.results.channels[0].alternatives[0]
        self.assertEqual(alternative.transcript, " ".join(self.heard))
        self.assertEqual([u.transcript for u in response.results.utterances], self.heard)
        self.assertAlmostEqual(response.metadata.duration, len(self.audio) / 16000, delta=0.2)
        # Raw audio, described in the query.
        raw = encode_samples(self.clips[0][0])
        response = yield self.in_thread(lambda: client.listen.v1.media.transcribe_file(
            request=raw, encoding="linear16", request_options={
                "additional_query_parameters": {"sample_rate": 16000}}))
        self.assertEqual(response.results.channels[0].alternatives[0].transcript,
                         self.heard_first)

    @defer.inlineCallbacks
    def test_prerecorded_refuses_urls(self):
        from deepgram.errors import BadRequestError

        client = self.deepgram()
        try:
            yield self.in_thread(lambda: client.listen.v1.media.transcribe_url(
                url="https://example.com/talk.wav"))
        except BadRequestError as e:
            self.assertIn("does not fetch audio from URLs", e.body["err_msg"])
        else:
            self.fail("a URL was accepted")



class DeepgramRefusalTests(_APIServer, unittest.TestCase):
    """Deepgram's clients refused in Deepgram's shapes; KeepAlive keeps a
    quiet stream open past --idle-timeout."""

    streams = 1
    flags = ("--idle-timeout", "1")

    @defer.inlineCallbacks
    def test_keep_alive_full_and_wrong_token(self):
        import time

        from deepgram.core.api_error import ApiError
        from websockets.exceptions import InvalidStatus

        client = self.deepgram()
        opened, checked = threading.Event(), threading.Event()

        def quiet():
            got = []
            with client.listen.v1.connect(model="nova-3", encoding="linear16",
                                          sample_rate=16000) as sock:
                opened.set()
                # Twice --idle-timeout with no audio, only KeepAlive.
                for _ in range(8):
                    sock.send_keep_alive()
                    time.sleep(0.25)
                checked.wait(30)
                for piece in pieces(encode_samples(self.clips[0][0]), 3200):
                    sock.send_media(piece)
                sock.send_close_stream()
                for message in sock:
                    got.append(message)
            return got

        def refused(f):
            def run():
                try:
                    f()
                except InvalidStatus as e:
                    return e.response.status_code, None
                except ApiError as e:
                    return e.status_code, e.body
            return self.in_thread(run)

        held = self.in_thread(quiet)
        yield wait_for(opened.is_set)
        live = lambda key=TOKEN: self.deepgram(key).listen.v1.connect(  # noqa: E731
            model="nova-3", encoding="linear16", sample_rate=16000).__enter__()
        file = lambda key=TOKEN: self.deepgram(key).listen.v1.media.transcribe_file(  # noqa: E731
            request=wav_bytes(self.clips[0][0]))
        self.assertEqual((yield refused(live)), (429, None))
        status, body = yield refused(file)
        self.assertEqual((status, body["err_code"]), (429, "TOO_MANY_REQUESTS"))
        status, body = yield refused(lambda: file("wrong"))
        self.assertEqual((status, body["err_code"]), (401, "INVALID_AUTH"))
        self.assertEqual((yield refused(lambda: live("wrong")))[0], 401)
        checked.set()
        got = yield held
        self.assertNotIn("Error", [m.type for m in got])
        self.assertEqual(" ".join(m.channel.alternatives[0].transcript for m in got
                                  if m.type == "Results").strip(), self.heard_first)


class OverTLSTests(_APIServer, unittest.TestCase):
    """The APIs on an HTTP port with TLS (--listen-http ssl:...)."""

    def setUp(self):
        from .support.servers import make_certificate, ssl_endpoint

        self.cert, key = make_certificate(self.mktemp())
        self.flags = ("--listen-http", ssl_endpoint(self.cert, key))
        return _APIServer.setUp(self)

    @defer.inlineCallbacks
    def test_https_and_wss(self):
        import ssl

        import httpx
        import openai

        http = httpx.Client(verify=ssl.create_default_context(cafile=self.cert))
        self.addCleanup(http.close)
        client = openai.OpenAI(api_key=TOKEN, base_url="https://localhost:%d/v1" % self.http,
                               websocket_base_url="wss://localhost:%d/v1" % self.http,
                               http_client=http, max_retries=0)
        result = yield self.in_thread(lambda: client.audio.transcriptions.create(
            model="whisper-1", file=("x.wav", wav_bytes(self.clips[0][0]))))
        self.assertEqual(result.text, self.heard_first)

        def realtime():
            options = {"ssl": ssl.create_default_context(cafile=self.cert)}
            with client.realtime.connect(extra_query={"intent": "transcription"},
                                         websocket_connection_options=options) as conn:
                return conn.recv().type

        self.assertEqual((yield self.in_thread(realtime)), "session.created")


class DrainTests(_APIServer, unittest.TestCase):
    """A server shutting down finalizes each API's open streams, in the API's
    shapes, and refuses new ones."""

    @defer.inlineCallbacks
    def test_drain(self):
        import openai
        from websockets.exceptions import InvalidStatus

        from deepgram.core.api_error import ApiError

        clip = encode_samples(self.clips[0][0])
        sent = [threading.Event(), threading.Event()]
        client = self.openai()

        def realtime():
            events = []
            with client.realtime.connect(extra_query={"intent": "transcription"}) as conn:
                conn.session.update(session={"type": "transcription", "audio": {"input": {
                    "format": {"type": "audio/pcm", "rate": 16000}}}})
                for piece in pieces(clip[:len(clip) // 2], 3200):
                    conn.input_audio_buffer.append(audio=base64.b64encode(piece).decode())
                sent[0].set()
                for event in conn:
                    events.append(event)
            return events

        dg = self.deepgram()

        def live():
            got = []
            with dg.listen.v1.connect(model="nova-3", encoding="linear16", sample_rate=16000,
                                      channels=1) as sock:
                for piece in pieces(clip[:len(clip) // 2], 3200):
                    sock.send_media(piece)
                sent[1].set()
                for message in sock:
                    got.append(message)
            return got

        first, second = self.in_thread(realtime), self.in_thread(live)
        yield wait_for(lambda: all(e.is_set() for e in sent))
        # Both streams hold all that was sent.
        half = len(clip[:len(clip) // 2]) // 2
        yield wait_for(lambda: len(self.server.registry) == 2 and all(
            s.received >= half for s in self.server.registry.in_turn()))
        drained = self.server.loop.drain(30)
        events = yield first
        got = yield second
        yield drained
        errors = [e.error for e in events if e.type == "error"]
        self.assertEqual([e.code for e in errors], ["server_shutting_down"])
        self.assertEqual(events[-1].type,
                         "conversation.item.input_audio_transcription.completed")
        self.assertEqual([m.type for m in got][0], "Error")
        self.assertEqual(got[0].variant, "shutdown")
        self.assertEqual([m.type for m in got][-2:], ["Results", "Metadata"])
        # New ones are refused, each in its API's way.
        try:
            yield self.in_thread(lambda: client.audio.transcriptions.create(
                model="whisper-1", file=("x.wav", wav_bytes(self.clips[0][0]))))
        except openai.InternalServerError as e:
            self.assertEqual((e.status_code, e.code), (503, "server_shutting_down"))
        else:
            self.fail("a file was taken while draining")
        try:
            yield self.in_thread(lambda: dg.listen.v1.connect(
                model="nova-3", encoding="linear16", sample_rate=16000).__enter__())
        except InvalidStatus as e:
            self.assertEqual(e.response.status_code, 503)
        else:
            self.fail("a live stream was taken while draining")
        try:
            yield self.in_thread(lambda: dg.listen.v1.media.transcribe_file(
                request=wav_bytes(self.clips[0][0])))
        except ApiError as e:
            self.assertEqual((e.status_code, e.body["err_code"]),
                             (503, "SERVICE_UNAVAILABLE"))
        else:
            self.fail("a file was taken while draining")
        # Counted like native streams, under their API's name.
        m = Scraped(scrape(self.server.metrics)[0])
        for transport in ("openai_realtime", "deepgram_live"):
            self.assertEqual(m("parakeet_streams_opened_total", transport=transport), 1)
        self.assertEqual(m("parakeet_streams_closed_total", reason="shutdown"), 2)
        self.assertEqual(m("parakeet_streams_refused_total", reason="draining"), 3)


class LiveKitAgentsTests(_APIServer, unittest.TestCase):
    """LiveKit Agents' Deepgram speech-to-text plugin, pointed at the server
    by its base_url, as a voice agent would run it."""

    def setUp(self):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                from livekit.plugins import deepgram
            del deepgram
        except ImportError as e:
            raise unittest.SkipTest("livekit-plugins-deepgram is not installed: %s" % (e,))
        return _APIServer.setUp(self)

    @defer.inlineCallbacks
    def test_stream(self):
        import asyncio

        import aiohttp
        from livekit import rtc
        from livekit.agents import stt as agents_stt
        from livekit.plugins import deepgram

        audio = encode_samples(self.audio)
        url = "http://127.0.0.1:%d/v1/listen" % self.http

        async def run():
            events = []
            async with aiohttp.ClientSession() as http:
                stt = deepgram.STT(api_key=TOKEN, base_url=url, http_session=http,
                                   model="nova-3", language="en-US", sample_rate=16000,
                                   interim_results=True, endpointing_ms=300,
                                   utterance_end_ms=1000)
                stream = stt.stream()

                async def feed():
                    # As fast as it goes: the server paces itself.
                    for piece in pieces(audio, 640):
                        stream.push_frame(rtc.AudioFrame(data=piece, sample_rate=16000,
                                                         num_channels=1,
                                                         samples_per_channel=len(piece) // 2))
                    stream.end_input()

                feeder = asyncio.ensure_future(feed())
                async for event in stream:
                    events.append(event)
                await feeder
                await stream.aclose()
            return events

        events = yield self.in_thread(lambda: asyncio.run(asyncio.wait_for(run(), 60)))
        kinds = agents_stt.SpeechEventType
        finals = [e.alternatives[0].text for e in events
                  if e.type == kinds.FINAL_TRANSCRIPT and e.alternatives[0].text]
        self.assertEqual(finals, self.heard)
        self.assertIn(kinds.INTERIM_TRANSCRIPT, [e.type for e in events])
        self.assertEqual([e.type for e in events].count(kinds.START_OF_SPEECH), 3)
        self.assertEqual([e.type for e in events].count(kinds.END_OF_SPEECH), 3)
        first = [e for e in events if e.type == kinds.FINAL_TRANSCRIPT][0].alternatives[0]
        self.assertLess(first.start_time, first.end_time)


class UploadsWaitForSlotsTests(_APIServer, unittest.TestCase):
    """A file needs a stream slot like a live stream: none free, 429 with Retry-After."""

    streams = 1

    @defer.inlineCallbacks
    def test_server_full(self):
        import openai

        from parakeet.clients import connection

        native = yield connection.connect(
            reactor, "ws://127.0.0.1:%d" % self.ports["WebSocket clients"], token=TOKEN)
        yield native.next(lambda m: m["type"] == "hello")
        client = self.openai()
        try:
            yield self.in_thread(lambda: client.audio.transcriptions.create(
                model="whisper-1", file=("x.wav", wav_bytes(self.clips[0][0]))))
        except openai.RateLimitError as e:
            self.assertEqual(e.response.headers["retry-after"], "1")
            self.assertEqual(e.code, "server_full")
        else:
            self.fail("a file was transcribed with no slot free")
        m = Scraped(scrape(self.server.metrics)[0])
        self.assertEqual(m("parakeet_streams_refused_total", reason="full"), 1)
        self.assertEqual(m("parakeet_errors_sent_total", kind="full"), 1)
        native.disconnect()
        yield native.closed
        yield wait_for(lambda: len(self.server.registry) == 0)


class ShapesTests(unittest.TestCase):
    """The parts that need no server: options, headers, formats."""

    def test_deepgram_options(self):
        from parakeet.server.apis.deepgram import OptionError, Options, options

        self.assertEqual(options({}), Options())
        got = options({"encoding": ["linear16"], "sample_rate": ["8000"], "channels": ["1"],
                       "interim_results": ["true"], "endpointing": ["false"],
                       "utterance_end_ms": ["1000"], "vad_events": ["true"],
                       "punctuate": ["true"], "keyterm": ["a", "b"], "model": ["nova-3"]})
        self.assertEqual(got, Options("pcm16", 8000, True, False, 1000, True,
                                      keyterms=("a", "b")))
        self.assertTrue(options({b"endpointing": [b"300"], b"utterances": [b"true"]}).utterances)
        for bad, says in [({"encoding": ["opus"]}, "not supported"),
                          ({"encoding": ["mulaw"]}, "sample_rate is required"),
                          ({"sample_rate": ["96000"]}, "sample_rate"),
                          ({"channels": ["2"]}, "one channel"),
                          ({"interim_results": ["yes"]}, "true or false"),
                          ({"utterance_end_ms": ["-5"]}, "utterance_end_ms"),
                          ({"endpointing": ["soon"]}, "endpointing")]:
            with self.assertRaises(OptionError) as caught:
                options(bad)
            self.assertIn(says, str(caught.exception))

    def test_wav_header(self):
        from parakeet.audio import AudioError
        from parakeet.server.apis.deepgram import wav_header

        data = wav_bytes(np.zeros(800, np.float32), 8000)
        self.assertEqual(wav_header(data), ("pcm16", 8000, 44))
        # A header that has not all come yet.
        for cut in (4, 20, 40):
            self.assertIsNone(wav_header(data[:cut]))
        with self.assertRaises(AudioError):
            wav_header(b"OggS" + bytes(40))
        import soundfile

        stereo = io.BytesIO()
        soundfile.write(stereo, np.zeros((10, 2), np.float32), 16000, format="WAV")
        with self.assertRaisesRegex(AudioError, "2 channels"):
            wav_header(stereo.getvalue())

    def test_api_credentials(self):
        from parakeet.server.auth import Credential, Refusal, api_credential

        for headers, protocols in [({"authorization": "Bearer abc"}, []),
                                   ({"authorization": "Token abc"}, []),
                                   ({}, ["realtime", "openai-insecure-api-key.abc",
                                         "openai-beta.realtime-v1"]),
                                   ({}, ["token", "abc"])]:
            found = api_credential(headers, protocols)
            self.assertIsInstance(found, Credential)
            self.assertEqual(found.token, b"abc")
        for headers, protocols in [({}, []), ({"authorization": "Basic abc"}, []),
                                   ({}, ["token"])]:
            self.assertIsInstance(api_credential(headers, protocols), Refusal)

    def test_realtime_settings(self):
        from parakeet.server.apis.realtime import EventError, _format, _turn_detection

        self.assertEqual(_format({"type": "audio/pcm"}),
                         ("pcm16", 24000, {"type": "audio/pcm", "rate": 24000}))
        self.assertEqual(_format("g711_alaw"), ("alaw", 8000, {"type": "audio/pcma"}))
        self.assertEqual(_format({"type": "audio/pcmu"})[:2], ("mulaw", 8000))
        self.assertEqual(_turn_detection({"type": "semantic_vad", "eagerness": "low"}),
                         {"type": "semantic_vad"})
        self.assertIsNone(_turn_detection(None))
        for bad in ({"type": "audio/opus"}, {"type": "audio/pcmu", "rate": 16000},
                    {"type": "audio/pcm", "rate": 4000}, 7):
            self.assertRaises(EventError, _format, bad)
        for bad in ({"type": "push_to_talk"}, {"silence_duration_ms": -1},
                    {"threshold": 2}):
            self.assertRaises(EventError, _turn_detection, bad)

    def test_subtitles(self):
        from parakeet.server.apis.transcriptions import srt, vtt

        utterances = [
            {"text": "turn on the lights", "start_ms": 480, "end_ms": 1760,
             "words": [{"word": "turn"}]},
            {"text": "", "start_ms": 2000, "end_ms": 2000, "words": []},
            {"text": "thank you", "start_ms": 3723400, "end_ms": 3724000,
             "words": [{"word": "thank"}]},
        ]
        self.assertEqual(srt(utterances),
                         "1\n00:00:00,480 --> 00:00:01,760\nturn on the lights\n\n"
                         "2\n01:02:03,400 --> 01:02:04,000\nthank you\n\n")
        self.assertEqual(vtt(utterances),
                         "WEBVTT\n\n00:00:00.480 --> 00:00:01.760\nturn on the lights\n\n"
                         "01:02:03.400 --> 01:02:04.000\nthank you\n\n")
