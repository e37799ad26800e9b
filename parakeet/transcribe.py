"""
``parakeet-server transcribe``: stream an audio file to a running server
and print its transcript.
"""

import sys

from twisted.internet import defer, task
from twisted.python import usage

from .models import DEMO_SAMPLE


def _speed(value):
    speed = float(value)
    if speed <= 0:
        raise ValueError("--speed must be positive")
    return speed


class Options(usage.Options):
    synopsis = "[options] [FILE]"
    longdesc = ("Stream FILE (WAV or FLAC; default: the demo model's bundled "
                "sample) to a running server in 100 ms messages, paced in real "
                "time, and print the final transcript.")
    optParameters = [
        ("url", "u", "ws://127.0.0.1:8000", "Server address: ws://HOST:PORT or "
         "tcp://HOST:PORT."),
        ("speed", None, 1.0, "Send audio this many times faster than real time.",
         _speed),
    ]
    optFlags = [
        ("partials", "p", "Also print each partial transcript as it arrives."),
    ]

    def parseArgs(self, path=DEMO_SAMPLE):
        self["file"] = path


@defer.inlineCallbacks
def transcribe(reactor, url, source, speed=1.0, out=None, partials=False):
    """Stream source (a bench.AudioSource) to the server at url; fires with
    the final transcript."""
    from .client import connect

    out = out or sys.stdout
    client = yield connect(reactor, url)
    hello = yield client.next(lambda m: m.get("type") in ("hello", "error"))
    if hello["type"] == "error":
        raise RuntimeError(hello["message"])
    samples = source.at_rate(int(hello["sample_rate"]))
    piece = int(hello["sample_rate"]) // 10
    shown = []

    def show(message):
        if message.get("type") == "result" and not message["is_final"]:
            if message["text"] != (shown[-1] if shown else ""):
                shown.append(message["text"])
                out.write("... %s\n" % (message["text"],))
        return message

    if partials:
        client.on_message = show
    for start in range(0, len(samples), piece):
        last = start + piece >= len(samples)
        client.send_audio(samples[start:start + piece], final=last)
        if not last:
            yield task.deferLater(reactor, 0.1 / speed, lambda: None)
    final = yield client.final()
    # The server closes the connection after the final result.
    yield client.closed
    errors = client.errors()
    if errors:
        raise RuntimeError("; ".join(errors))
    out.write(final["text"] + "\n")
    return final["text"]


def main(options):
    from .bench import read_audio_file

    try:
        source = read_audio_file(options["file"])
    except (OSError, ValueError, RuntimeError) as e:
        sys.stderr.write("parakeet-server transcribe: cannot read %s: %s\n"
                         % (options["file"], e))
        return 2

    def failed(failure):
        sys.stderr.write("parakeet-server transcribe: %s\n" % (failure.getErrorMessage(),))
        raise SystemExit(1)

    def run(reactor):
        return transcribe(reactor, options["url"], source, options["speed"],
                          partials=options["partials"]).addCallbacks(lambda _: None, failed)

    task.react(run)
