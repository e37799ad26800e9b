"""
The browser page (parakeet/server/static) in headless Chromium against the real
server: Chromium's fake microphone plays held-out speech into the page, the
page streams it to the server running the demo model, and the transcript is
read from the page.  Also what the page says when the server is full, when
the token is wrong, when the connection is lost, when the microphone is
refused and when the page is not a secure context, and the page over TLS.

Chromium is driven over the DevTools protocol by tools/devtools.py.  The
tests are skipped only where Chromium is not installed (Debian's
``chromium``, which ``.ci/run`` installs).
"""

import importlib.util
import os
import sys

import numpy as np
from twisted.internet import defer, reactor
from twisted.protocols import portforward
from twisted.trial import unittest

from parakeet.clients import connection
from parakeet.training import corpus

from .support.models import HELDOUT, WER_BOUND, demo_engine
from .support.servers import ServerTestMixin

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_devtools():
    spec = importlib.util.spec_from_file_location(
        "devtools", os.path.join(ROOT, "tools", "devtools.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


devtools = _load_devtools()

#: Held-out clips the page hears, one after the other.
CLIPS = ("00010.flac", "00013.flac")
#: Silence after the speech, in seconds, so that the last utterance ends.
TRAILING_SILENCE = 1.5

STATE = "document.body.dataset.state"
UTTERANCES = """[...document.querySelectorAll('#utterances .utterance')].map(line => ({
    times: line.querySelector('.times').textContent,
    start_ms: Number(line.dataset.startMs), end_ms: Number(line.dataset.endMs),
    words: [...line.querySelectorAll('.word')].map(w => ({
        word: w.textContent, confidence: Number(w.dataset.confidence), title: w.title}))}))"""


def speech_wav(path):
    """Write the clips as one 16 kHz WAV; (its seconds, the words spoken)."""
    import soundfile

    rows = {row["audio_filepath"]: row
            for row in corpus.read_manifest(os.path.join(HELDOUT, "manifest.json"))}
    parts, words = [], []
    for name in CLIPS:
        audio, rate = soundfile.read(os.path.join(HELDOUT, name), dtype="float32")
        parts.append(audio)
        words.append(rows[name]["text"].replace(corpus.EOU, ""))
    parts.append(np.zeros(int(TRAILING_SILENCE * rate), dtype=np.float32))
    audio = np.concatenate(parts)
    soundfile.write(path, audio, rate, subtype="PCM_16")
    return len(audio) / rate, " ".join(words)


class _Connections(portforward.ProxyFactory):
    """A TCP proxy to the server whose connections the test can cut."""

    def __init__(self, host, port):
        portforward.ProxyFactory.__init__(self, host, port)
        self.open = []

    def buildProtocol(self, addr):
        proxy = portforward.ProxyFactory.buildProtocol(self, addr)
        self.open.append(proxy)
        return proxy

    def cut(self):
        for proxy in self.open:
            proxy.transport.abortConnection()


class BrowserPageTests(ServerTestMixin, unittest.TestCase):

    transport = "ws"

    def setUp(self):
        if devtools.find_chromium() is None:
            raise unittest.SkipTest("Chromium is not installed (Debian: apt-get install "
                                    "chromium)")

    def start(self, *flags, http=("--http-port", "0")):
        server = self.start_server(*http, *flags, engine=demo_engine())
        self.http_port = server.getServiceNamed("HTTP").port.getHost().port
        return server

    def page_url(self, host="127.0.0.1", query="", scheme="http"):
        return "%s://%s:%d/%s" % (scheme, host, self.http_port, query)

    @defer.inlineCallbacks
    def browser(self, microphone=None, args=(), allow_microphone=True):
        profile = os.path.abspath(self.mktemp())
        os.makedirs(profile)
        browser = yield devtools.Browser.launch(reactor, profile, microphone=microphone,
                                                args=list(args),
                                                allow_microphone=allow_microphone)
        self.addCleanup(browser.close)
        return browser

    @defer.inlineCallbacks
    def test_transcribes_the_microphone(self):
        self.start()
        wav = os.path.abspath(self.mktemp() + ".wav")
        seconds, spoken = speech_wav(wav)
        browser = yield self.browser(microphone=wav)
        page = yield browser.open(self.page_url())
        self.assertEqual((yield page.evaluate(STATE)), "idle")
        self.assertEqual((yield page.evaluate("document.getElementById('server-url')"
                                              ".textContent")),
                         "ws://127.0.0.1:%d/ws" % (self.http_port,))
        yield page.evaluate("document.getElementById('start').click()")
        # The whole file, its trailing silence included, has gone out.
        yield page.wait_for("Number(document.body.dataset.sentSeconds) >= %.1f || %s === "
                            "'error'" % (seconds, STATE))
        self.assertEqual((yield page.evaluate(STATE)), "listening",
                         (yield page.evaluate("document.getElementById('error').textContent")))
        # The page names the model the server said it serves, and what the
        # demo model knows.
        self.assertEqual((yield page.evaluate("document.getElementById('model').textContent")),
                         "demo")
        note = yield page.evaluate("document.getElementById('model-note').textContent")
        self.assertIn("demo model", note)
        self.assertFalse((yield page.evaluate("document.getElementById('model-note').hidden")))
        yield page.evaluate("document.getElementById('stop').click()")
        state = yield page.wait_for("['done', 'error'].includes(%s) && %s" % (STATE, STATE))
        error = yield page.evaluate("document.getElementById('error').textContent")
        self.assertEqual((state, error), ("done", ""), "\n".join(page.log))
        lines = yield page.evaluate(UTTERANCES)
        yield page.screenshot(os.path.abspath(self.mktemp() + ".png"))

        heard = " ".join(w["word"] for line in lines for w in line["words"])
        sys.stderr.write("[spoken: %r; the page shows: %r] " % (
            spoken, [line["times"] + " " + " ".join(w["word"] for w in line["words"])
                     for line in lines]))
        self.assertLessEqual(corpus.word_error_rate([(spoken, heard)]), WER_BOUND,
                             (spoken, lines))
        # Each sentence is an utterance of its own, in order, within the audio.
        self.assertEqual(len(lines), len(CLIPS), lines)
        for before, after in zip(lines, lines[1:]):
            self.assertLessEqual(before["end_ms"], after["start_ms"])
        for line in lines:
            self.assertTrue(0 <= line["start_ms"] <= line["end_ms"] <= seconds * 1000, line)
            for word in line["words"]:
                self.assertTrue(0.0 <= word["confidence"] <= 1.0, word)
                # Shown rounded as a percentage (as JavaScript's Math.round does).
                self.assertIn("confidence %d%%" % int(word["confidence"] * 100 + 0.5),
                              word["title"])
        self.assertEqual((yield page.evaluate("document.getElementById('status')"
                                              ".textContent")),
                         "Done: %d utterances." % (len(lines),))
        yield self.wait_for_streams_closed()

    @defer.inlineCallbacks
    def test_server_full(self):
        self.start("--max-num-streams", "1")
        holder = yield connection.connect(reactor, self.address())
        self.addCleanup(self._hang_up, holder)
        yield holder.next(lambda m: m["type"] == "hello")
        browser = yield self.browser()
        page = yield browser.open(self.page_url())
        yield page.evaluate("document.getElementById('start').click()")
        self.assertEqual((yield page.wait_for("%s === 'error' && %s" % (STATE, STATE))),
                         "error")
        error = yield page.evaluate("document.getElementById('error').textContent")
        self.assertIn("The server is full", error)
        # Start is offered again.
        self.assertFalse((yield page.evaluate("document.getElementById('start').disabled")))

    @defer.inlineCallbacks
    def test_token(self):
        # With authentication on, the page's token field goes with the
        # stream (as ?token=): a wrong one is refused, the right one streams.
        tokens = os.path.abspath(self.mktemp())
        with open(tokens, "w") as f:
            f.write("# the page's token\nright-token\n")
        self.start("--auth-tokens", tokens)
        browser = yield self.browser()
        page = yield browser.open(self.page_url())
        yield page.evaluate("document.getElementById('token').value = 'wrong-token'; "
                            "document.getElementById('start').click()")
        self.assertEqual((yield page.wait_for("%s === 'error' && %s" % (STATE, STATE))),
                         "error")
        error = yield page.evaluate("document.getElementById('error').textContent")
        self.assertTrue(error.startswith("Authentication failed: "), error)
        yield page.evaluate("document.getElementById('token').value = 'right-token'; "
                            "document.getElementById('start').click()")
        yield page.wait_for("Number(document.body.dataset.sentSeconds) >= 0.5 || %s === "
                            "'error'" % (STATE,))
        self.assertEqual((yield page.evaluate(STATE)), "listening")
        self.assertEqual((yield page.evaluate("document.getElementById('error').hidden")),
                         True)
        yield page.evaluate("document.getElementById('stop').click()")
        self.assertEqual((yield page.wait_for("['done', 'error'].includes(%s) && %s"
                                              % (STATE, STATE))), "done")
        yield self.wait_for_streams_closed()

    @defer.inlineCallbacks
    def test_over_https(self):
        # Served over TLS, the page streams over wss:// to the same port.
        from .support.servers import make_certificate
        from .support.servers import ssl_endpoint

        cert, key = make_certificate(self.mktemp())
        self.start(http=("--listen-http", ssl_endpoint(cert, key)))
        browser = yield self.browser(args=["--ignore-certificate-errors"])
        page = yield browser.open(self.page_url(host="localhost", scheme="https"))
        self.assertEqual((yield page.evaluate("document.getElementById('server-url')"
                                              ".textContent")),
                         "wss://localhost:%d/ws" % (self.http_port,))
        yield page.evaluate("document.getElementById('start').click()")
        yield page.wait_for("Number(document.body.dataset.sentSeconds) >= 0.5 || %s === "
                            "'error'" % (STATE,))
        self.assertEqual((yield page.evaluate(STATE)), "listening",
                         (yield page.evaluate("document.getElementById('error').textContent")))
        yield page.evaluate("document.getElementById('stop').click()")
        self.assertEqual((yield page.wait_for("['done', 'error'].includes(%s) && %s"
                                              % (STATE, STATE))), "done")
        yield self.wait_for_streams_closed()

    @defer.inlineCallbacks
    def test_connection_lost(self):
        # The page talks to the server through a proxy (given as ?server=),
        # whose connections are then cut.
        self.start()
        proxy = _Connections("127.0.0.1", self.http_port)
        listening = reactor.listenTCP(0, proxy, interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        server = "ws://127.0.0.1:%d/ws" % (listening.getHost().port,)
        browser = yield self.browser()
        page = yield browser.open(self.page_url(query="?server=" + server))
        self.assertEqual((yield page.evaluate("document.getElementById('server-url')"
                                              ".textContent")), server)
        yield page.evaluate("document.getElementById('start').click()")
        yield page.wait_for("Number(document.body.dataset.sentSeconds) >= 0.5")
        proxy.cut()
        self.assertEqual((yield page.wait_for("%s === 'error' && %s" % (STATE, STATE))),
                         "error")
        error = yield page.evaluate("document.getElementById('error').textContent")
        self.assertIn("The connection to the server was lost before the final result", error)
        yield self.wait_for_streams_closed()

    @defer.inlineCallbacks
    def test_microphone_denied(self):
        # Headless Chromium with no prompt to answer refuses the microphone.
        self.start()
        browser = yield self.browser(allow_microphone=False)
        page = yield browser.open(self.page_url())
        yield page.evaluate("document.getElementById('start').click()")
        self.assertEqual((yield page.wait_for("%s === 'error' && %s" % (STATE, STATE))),
                         "error")
        error = yield page.evaluate("document.getElementById('error').textContent")
        self.assertTrue(error.startswith("Microphone access was denied."), error)
        self.assertEqual(len(self.server.registry), 0)

    @defer.inlineCallbacks
    def test_not_a_secure_context(self):
        # A host name other than localhost over http: no microphone.
        self.start()
        browser = yield self.browser(args=["--host-resolver-rules=MAP speech.test 127.0.0.1"])
        page = yield browser.open(self.page_url(host="speech.test"))
        self.assertFalse((yield page.evaluate("window.isSecureContext")))
        self.assertIn("not a secure context", (yield page.evaluate(
            "document.getElementById('error').textContent")))
        yield page.evaluate("document.getElementById('start').click()")
        self.assertEqual((yield page.wait_for("%s === 'error' && %s" % (STATE, STATE))),
                         "error")
        error = yield page.evaluate("document.getElementById('error').textContent")
        self.assertIn("https://", error)
        self.assertIn("localhost", error)

    def wait_for_streams_closed(self):
        from .support.servers import wait_for

        return wait_for(lambda: len(self.server.registry) == 0)
