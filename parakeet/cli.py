"""
The ``parakeet-server`` command.
"""

import sys

from twisted.python import usage

from .clients import bench, transcribe
from . import demo
from .server import tap
from .options import CommandOptions


class Options(CommandOptions):
    synopsis = "Usage: parakeet-server [--version | --help] <command> [options]"
    # The first positional argument is the command; what follows is its own.
    permute = False
    subCommands = [
        ("serve", None, tap.Options, "Run the streaming speech recognition server."),
        ("demo", None, demo.Options, "Try it with no internet and no GPU: serve the "
         "built-in demo model, stream a sample to it, and keep serving."),
        ("bench", None, bench.Options, "Load a running server with real-time streams "
         "and report latency."),
        ("transcribe", None, transcribe.Options, "Stream audio files to a running "
         "server and print their utterances."),
    ]

    def postOptions(self):
        if self.subCommand is None:
            raise usage.UsageError("choose a command: serve, demo, transcribe or bench")

    def __str__(self):
        # After a command's options were parsed (a usage error in them), its
        # own usage.
        if getattr(self, "subOptions", None) is not None:
            return str(self.subOptions)
        return usage.Options.__str__(self)

    def getSynopsis(self):
        if self.subCommand is not None:
            # What a command's synopsis follows: "parakeet-server serve [options]".
            return "Usage: parakeet-server"
        return self.synopsis

    def getUsage(self, width=None):
        text = usage.Options.getUsage(self, width)
        if self.subCommand is None:
            text += "\n'parakeet-server COMMAND --help' shows a command's options.\n"
            text += "\nOptions of 'parakeet-server serve':\n"
            text += tap.Options().getUsage(width).split("Options:", 1)[-1]
        return text


def setup_logging(stream=None, level="info"):
    from twisted.logger import (
        FilteringLogObserver, LogLevel, LogLevelFilterPredicate, globalLogBeginner,
        textFileLogObserver)

    observer = FilteringLogObserver(
        textFileLogObserver(stream or sys.stdout),
        [LogLevelFilterPredicate(defaultLogLevel=LogLevel.levelWithName(level))])
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)


def serve(config):
    from twisted.internet import reactor

    setup_logging()
    top = tap.makeService(config, reactor)
    reactor.callWhenRunning(_start, top, reactor)
    reactor.run()
    return top.exit_code


def _start(top, reactor):
    try:
        top.startService()
    except Exception as e:
        sys.stderr.write("parakeet-server: cannot start: %s\n" % (e,))
        top.exit_code = 1
        reactor.stop()
        return
    reactor.addSystemEventTrigger("before", "shutdown", top.stopService)


def main(argv=None):
    options = Options()
    try:
        options.parseOptions(sys.argv[1:] if argv is None else argv)
    except usage.UsageError as e:
        sys.stderr.write("%s\nparakeet-server: %s\n" % (options, e))
        sys.exit(2)
    if options.subCommand == "serve":
        sys.exit(serve(options.subOptions))
    if options.subCommand == "demo":
        setup_logging(level="warn")
        sys.exit(demo.main(options.subOptions, _start))
    if options.subCommand == "bench":
        sys.exit(bench.main(options.subOptions, sys.argv[1:] if argv is None else argv))
    if options.subCommand == "transcribe":
        sys.exit(transcribe.main(options.subOptions))
