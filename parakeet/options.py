"""
What every ``parakeet-server`` command's options share: options before or
after the positional arguments, as GNU tools take them (``transcribe FILE
--url URL``; plain ``getopt``, which Twisted's parser uses, stops at the
first file), ``--version`` naming this package (Twisted's own prints
Twisted's version), and the types of numeric options: a port number,
numbers that must be positive or not negative.
"""

import getopt
import sys

from twisted.python import usage

from . import __version__


class CommandOptions(usage.Options):
    """usage.Options for one command.  permute: options may follow
    positional arguments (False for a parser of subcommands, whose first
    positional argument ends its own options)."""

    permute = True

    def parseOptions(self, options=None):
        if options is None:
            options = sys.argv[1:]
        if self.permute:
            try:
                opts, args = getopt.gnu_getopt(options, self.shortOpt, self.longOpt)
            except getopt.error as e:
                raise usage.UsageError(str(e))
            ordered = []
            for opt, value in opts:
                if opt.startswith("--"):
                    takes_value = opt[2:] + "=" in self.longOpt
                    ordered.append(opt + "=" + value if takes_value else opt)
                else:
                    ordered += [opt, value] if opt[1] + ":" in self.shortOpt else [opt]
            options = ordered + ["--"] + args
        super().parseOptions(options)

    def opt_version(self):
        """Print the version and exit."""
        print("parakeet-server %s" % (__version__,))
        sys.exit(0)


# Option types: each turns an option's text into its value, or raises
# ValueError saying what it must be.

def port_number(value):
    """A TCP port, 0 to 65535 (0: the system picks a free one)."""
    port = int(value)
    if not 0 <= port <= 65535:
        raise ValueError("a port is a number from 0 to 65535")
    return port


def positive(kind):
    """The option type of a number of kind (int, float) greater than zero."""
    def coerce(value):
        number = kind(value)
        if number <= 0:
            raise ValueError("must be greater than zero")
        return number
    return coerce


def not_negative(kind):
    """The option type of a number of kind (int, float) zero or greater."""
    def coerce(value):
        number = kind(value)
        if number < 0:
            raise ValueError("must not be negative")
        return number
    return coerce
