"""
The daemon: transports, the stream protocol, the registry of streams, the
decode loop and what the server says of itself.  It runs on the reactor
thread and imports neither torch nor NeMo; ``tap`` loads the engine on a
thread of its own.
"""
