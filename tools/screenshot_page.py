"""
A screenshot of the browser page after it has transcribed speech, for the
documentation (docs/browser-page.png).

Starts ``parakeet-server serve --model demo`` on free loopback ports, has
headless Chromium's fake microphone play held-out sentences
(tests/data/heldout) into the page at the server's HTTP port, presses Start,
presses Stop once the audio has been sent, and saves the page once the final
result is in.  Needs Chromium (Debian: ``apt-get install chromium``).

    python tools/screenshot_page.py [--out docs/browser-page.png]
    python tools/screenshot_page.py --page 'http://127.0.0.1:8080/' --clips 00010.flac

``--page`` uses a server that is already running instead.
"""

import argparse
import os
import re
import shutil
import sys
import tempfile

import numpy as np
from twisted.internet import defer, protocol, task

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import devtools  # noqa: E402

HELDOUT = os.path.join(ROOT, "tests", "data", "heldout")
STATE = "document.body.dataset.state"


def speech_wav(path, clips, silence=1.5):
    """The clips one after the other, then silence, as one WAV; its seconds."""
    import soundfile

    parts = []
    for name in clips:
        audio, rate = soundfile.read(os.path.join(HELDOUT, name), dtype="float32")
        parts.append(audio)
    parts.append(np.zeros(int(silence * rate), dtype=np.float32))
    audio = np.concatenate(parts)
    soundfile.write(path, audio, rate, subtype="PCM_16")
    return len(audio) / rate


class _Server(protocol.ProcessProtocol):
    """``parakeet-server serve``; ``ready`` fires with its HTTP port."""

    def __init__(self):
        self.output = b""
        self.ready = defer.Deferred()
        self.ended = defer.Deferred()
        self.port = None

    def outReceived(self, data):
        self.output += data
        if self.port is None:
            match = re.search(rb"listening for HTTP on 127\.0\.0\.1:(\d+)", self.output)
            if match:
                self.port = int(match.group(1))
        if self.port is not None and not self.ready.called and b"ready: serving" in self.output:
            self.ready.callback(self.port)

    errReceived = outReceived

    def processEnded(self, reason):
        if not self.ready.called:
            self.ready.errback(RuntimeError("the server exited:\n%s"
                                            % self.output.decode("utf-8", "replace")))
        self.ended.callback(None)


@defer.inlineCallbacks
def start_server(reactor):
    server = _Server()
    executable = os.path.join(os.path.dirname(sys.executable), "parakeet-server")
    argv = [executable, "serve", "--model", "demo", "--device", "cpu",
            "--host", "127.0.0.1", "--port", "0", "--ws-port", "0", "--http-port", "0"]
    process = reactor.spawnProcess(server, executable, argv, env=dict(os.environ),
                                   path=ROOT)
    port = yield server.ready
    return process, server, "http://127.0.0.1:%d/" % (port,)


@defer.inlineCallbacks
def shoot(reactor, options):
    scratch = tempfile.mkdtemp()
    process = None
    try:
        if options.page:
            url = options.page
        else:
            process, server, url = yield start_server(reactor)
        wav = os.path.join(scratch, "speech.wav")
        seconds = speech_wav(wav, options.clips)
        browser = yield devtools.Browser.launch(
            reactor, os.path.join(scratch, "profile"), microphone=wav,
            width=options.width, height=options.height)
        try:
            page = yield browser.open(url)
            yield page.evaluate("document.getElementById('start').click()")
            yield page.wait_for("Number(document.body.dataset.sentSeconds) >= %.1f || %s "
                                "=== 'error'" % (seconds, STATE))
            yield page.evaluate("document.getElementById('stop').click()")
            state = yield page.wait_for("['done', 'error'].includes(%s) && %s"
                                        % (STATE, STATE))
            yield page.evaluate("document.activeElement.blur()")
            yield page.screenshot(options.out)
            lines = yield page.evaluate(
                "[...document.querySelectorAll('#utterances .utterance')]"
                ".map(line => line.textContent)")
        finally:
            yield browser.close()
        print("%s: %s; %s" % (options.out, state, lines))
    finally:
        if process is not None:
            process.signalProcess("TERM")
            yield server.ended
        shutil.rmtree(scratch, ignore_errors=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "docs", "browser-page.png"))
    parser.add_argument("--page", help="the page of a server already running")
    parser.add_argument("--clips", nargs="+", default=["00010.flac", "00013.flac"],
                        help="held-out clips the microphone plays")
    parser.add_argument("--width", type=int, default=1000)
    parser.add_argument("--height", type=int, default=560)
    options = parser.parse_args(argv)
    options.out = os.path.abspath(options.out)
    task.react(shoot, [options])


if __name__ == "__main__":
    main()
