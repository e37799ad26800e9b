"""
The ``parakeet-server`` command.
"""

import sys

from twisted.python import usage

from . import __version__, bench, tap, transcribe


class Options(usage.Options):
    synopsis = "Usage: parakeet-server <command> [options]"
    subCommands = [
        ("serve", None, tap.Options, "Run the streaming speech recognition server."),
        ("bench", None, bench.Options, "Load a running server with real-time streams "
         "and report latency."),
        ("transcribe", None, transcribe.Options, "Stream audio files to a running "
         "server and print their utterances."),
    ]

    def opt_version(self):
        """Print the version and exit."""
        print("parakeet-server %s" % (__version__,))
        sys.exit(0)

    def postOptions(self):
        if self.subCommand is None:
            raise usage.UsageError("choose a command: serve, bench or transcribe")

    def getUsage(self, width=None):
        text = usage.Options.getUsage(self, width)
        if self.subCommand is None:
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
    return getattr(reactor, "_parakeet_exit_code", 0)


def _start(top, reactor):
    try:
        top.startService()
    except Exception as e:
        sys.stderr.write("parakeet-server: cannot start: %s\n" % (e,))
        reactor._parakeet_exit_code = 1
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
    if options.subCommand == "bench":
        sys.exit(bench.main(options.subOptions, sys.argv[1:] if argv is None else argv))
    if options.subCommand == "transcribe":
        sys.exit(transcribe.main(options.subOptions))
