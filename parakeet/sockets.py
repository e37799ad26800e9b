"""
Socket helpers the server's transports and the clients share, and the one
place this project relies on Autobahn or Twisted beyond their documented
API.

Those names, each checked here before it is used:

* Autobahn's ``WebSocketProtocol._dataReceived``: what the Twisted
  adapter's public ``dataReceived`` calls after formatting a debug log line's arguments (type
  and peer names, highlighted) on every read, with debug logging off too: a
  third of what it spends on a frame of audio.  :func:`skip_debug_formatting`
  calls it directly when it is there, and falls back to ``dataReceived``
  (slower, the same bytes handled) when a release no longer has it.
* Autobahn's ``sendCloseFrame``, undocumented but public: the server's
  refusal of a WebSocket client sends close code 1008, which the documented
  ``sendClose`` does not accept (it takes 1000 and 3000-4999 only);
  ``parakeet.server.transports`` uses it.

Twisted's own API is used as documented throughout; the tests use
``twisted.web.test.requesthelper.DummyRequest``, which Twisted ships for
tests of web resources.
"""

from autobahn.twisted.websocket import WebSocketAdapterProtocol
from autobahn.websocket.protocol import WebSocketProtocol

#: Whether this Autobahn has the private reader skip_debug_formatting uses.
DIRECT_READ = callable(getattr(WebSocketProtocol, "_dataReceived", None))


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
    machinery, without the debug formatting of its ``dataReceived`` (see
    above)."""
    if DIRECT_READ:
        proto._dataReceived(data)
    else:
        WebSocketAdapterProtocol.dataReceived(proto, data)
