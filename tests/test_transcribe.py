"""
``parakeet-server transcribe`` against a live server on loopback.
"""

import io
import sys

import numpy as np
from twisted.internet import defer, reactor
from twisted.trial import unittest

from parakeet import transcribe
from parakeet.bench import AudioSource

from .helpers import speechlike
from .test_end_to_end import ServerTestMixin


class TranscribeTests(ServerTestMixin):

    @defer.inlineCallbacks
    def test_prints_partials_and_the_final_transcript(self):
        self.start_server()
        # 8 kHz audio: the command resamples it to the server's rate.
        samples = speechlike(3, 2.0)[::2].copy()
        source = AudioSource(samples.astype(np.float32), 8000, "test audio")
        out = io.StringIO()
        text = yield transcribe.transcribe(reactor, self.address(), source, speed=20.0,
                                           out=out, partials=True)
        lines = out.getvalue().splitlines()
        self.assertEqual(lines[-1], text)
        self.assertTrue(text)
        partials = lines[:-1]
        self.assertTrue(partials)
        for line in partials:
            self.assertTrue(line.startswith("... "), line)
        # Each partial is a prefix of what follows it.
        shown = [line[4:] for line in partials] + [text]
        for before, after in zip(shown, shown[1:]):
            self.assertTrue(after.startswith(before), (before, after))

    @defer.inlineCallbacks
    def test_server_error(self):
        # A full server answers the handshake with an error: the command
        # reports it instead of streaming.
        self.start_server("--max-num-streams", "1")
        first = yield self.connect()
        yield first.next(lambda m: m["type"] == "hello")
        source = AudioSource(speechlike(4, 0.5), 16000, "test audio")
        d = transcribe.transcribe(reactor, self.address(), source, out=io.StringIO())
        failure = yield self.assertFailure(d, RuntimeError)
        self.assertIn("No free streaming state", str(failure))


class TCPTranscribeTests(TranscribeTests, unittest.TestCase):
    transport = "tcp"


class WebSocketTranscribeTests(TranscribeTests, unittest.TestCase):
    transport = "ws"


class CommandLineTests(unittest.TestCase):

    def test_unreadable_file(self):
        options = transcribe.Options()
        options.parseOptions([self.mktemp()])
        stderr = io.StringIO()
        self.patch(sys, "stderr", stderr)
        self.assertEqual(transcribe.main(options), 2)
        self.assertIn("cannot read", stderr.getvalue())

    def test_options(self):
        options = transcribe.Options()
        options.parseOptions(["--url", "tcp://h:1", "--speed", "4", "-p", "x.wav"])
        self.assertEqual((options["url"], options["speed"], options["partials"], options["file"]),
                         ("tcp://h:1", 4.0, 1, "x.wav"))
        defaults = transcribe.Options()
        defaults.parseOptions([])
        self.assertEqual(defaults["file"], transcribe.DEMO_SAMPLE)
        for bad in (["--speed", "0"], ["--speed", "x"]):
            self.assertRaises(Exception, transcribe.Options().parseOptions, bad)
