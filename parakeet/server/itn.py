"""
Written forms of utterances, off the reactor thread: a normaliser
(``parakeet.engine.nemo.itn.Normalizer``) runs on a thread of its own, one
utterance at a time, and each session waits for its utterances' written
words in order (``StreamSession``).
"""

from twisted.application import service
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool


class WrittenForms(service.Service):

    def __init__(self, reactor, normalizer):
        self.reactor = reactor
        self.normalizer = normalizer
        self.pool = ThreadPool(1, 1, "parakeet-itn")

    def startService(self):
        service.Service.startService(self)
        self.pool.start()

    def stopService(self):
        service.Service.stopService(self)
        self.pool.stop()

    def utterance(self, words):
        """A Deferred of an utterance's written words (``Normalizer.utterance``)."""
        return deferToThreadPool(self.reactor, self.pool, self.normalizer.utterance, words)
