"""
Two small socket helpers that the server's transports and the clients
share: turning Nagle's algorithm off (:func:`send_at_once`), and reading an
Autobahn WebSocket connection without formatting a debug line per read
(:func:`skip_debug_formatting`).
"""


def send_at_once(transport):
    """Turn Nagle's algorithm off: a result (or, from the bench, an audio
    message) is a small message the other end is waiting on, not to be held
    back for the acknowledgement of the last one.  (A Unix socket has
    nothing to turn off.)"""
    try:
        transport.setTcpNoDelay(True)
    except (AttributeError, OSError):
        pass


def skip_debug_formatting(proto, data):
    """Hand data read from an Autobahn protocol's transport to its WebSocket
    machinery.  Autobahn's own ``dataReceived`` first formats the arguments
    of a debug log line (type and peer names, highlighted) on every read,
    with debug logging off too: a third of what it spends on a frame of
    audio."""
    proto._dataReceived(data)
