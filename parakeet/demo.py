"""
``parakeet-server demo``: from a fresh install to a transcript, with no
internet and no GPU.  Starts the server with the built-in demo model,
waits until it has loaded, streams the bundled sample to it in real time,
prints what was said and what was heard, and leaves the server running
with the browser page's address until Ctrl-C.
"""

import sys

from twisted.internet import defer

from .server import tap
from .clients import transcribe
from .checkpoints import DEMO_SAMPLE, DEMO_SAMPLE_TEXT
from .options import CommandOptions, port_number

NAME = "parakeet-server demo"


class Options(CommandOptions):
    synopsis = "[options]"
    longdesc = ("Start the server with the built-in demo model (no download), "
                "stream the bundled sample to it, print what was said and what was "
                "heard, and keep serving: the browser page transcribes the "
                "microphone.  Ctrl-C stops it.")
    optParameters = [
        ("host", None, "127.0.0.1", "Interface to listen on."),
        ("port", None, 8765, "TCP port.", port_number),
        ("ws-port", None, 8000, "WebSocket port.", port_number),
        ("http-port", None, 8080, "HTTP port of the browser page.", port_number),
        ("device", None, "cpu", "PyTorch device: cpu, cuda or cuda:N."),
    ]

    def server_options(self):
        """The ``serve`` options this demo runs the server with."""
        config = tap.Options()
        config.parseOptions([
            "--model", "demo", "--device", self["device"], "--host", self["host"],
            "--port", str(self["port"]), "--ws-port", str(self["ws-port"]),
            "--http-port", str(self["http-port"])])
        return config


def _host(options):
    return "127.0.0.1" if options["host"] in ("0.0.0.0", "") else options["host"]


@defer.inlineCallbacks
def show_sample(reactor, options, out, started):
    """Stream the bundled sample once the server is up; print both texts."""
    from .clients.audiofiles import read_audio_file

    url = "ws://%s:%d" % (_host(options), options["ws-port"])
    source = read_audio_file(DEMO_SAMPLE)
    out.write("%s: loading the built-in demo model on %s...\n" % (NAME, options["device"]))
    out.flush()

    def loaded(hello):
        out.write("ready after %.1f s; streaming the bundled sample (%.1f s) in "
                  "real time:\n" % (reactor.seconds() - started, source.seconds))
        out.flush()

    final = yield transcribe.stream(reactor, url, source, pace=1.0, wait=300.0,
                                    on_hello=loaded)
    out.write("  said:  %s\n  heard: %s\n\n" % (
        DEMO_SAMPLE_TEXT, final["text"].strip() or transcribe.NOTHING_HEARD))
    out.write("The server is running with the demo model, which knows a voice "
              "assistant's words: digits, numbers, times and commands.\n"
              "  page (speak to it):  http://%s:%d/\n"
              "  WebSocket:           %s\n"
              "  TCP:                 %s:%d\n"
              "  OpenAI and Deepgram: http://%s:%d/v1 (their clients' base URL)\n"
              "  try:                 parakeet-server transcribe --url %s FILE.wav\n"
              "Ctrl-C stops it.\n" % (
                  _host(options), options["http-port"], url, _host(options),
                  options["port"], _host(options), options["http-port"], url))
    out.flush()


def main(options, start, out=None):
    """Run the demo; start(service, reactor) starts the server's service
    (``cli._start``).  Returns the exit status."""
    from twisted.internet import reactor

    out = out or sys.stdout
    status = []

    def failed(failure):
        sys.stderr.write("%s: %s\n" % (NAME, failure.getErrorMessage()))
        status.append(1)
        reactor.stop()

    def go():
        start(top, reactor)
        if reactor.running:
            show_sample(reactor, options, out, started).addErrback(failed)

    top = tap.makeService(options.server_options(), reactor)
    started = reactor.seconds()
    reactor.callWhenRunning(go)
    reactor.run()
    return (status or [top.exit_code])[0]
