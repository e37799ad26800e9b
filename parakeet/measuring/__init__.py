"""
Measuring tools beside the product (docs/measuring.rst): the engine
in-process with no sockets, what a message costs the reactor, and
random-weight replicas of the served models.  Nothing in the server, the
engine or the clients imports them.
"""
