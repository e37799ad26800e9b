"""
The decode loop: batches ready chunks of every stream into one model step.

A step takes the next chunk of each stream whose audio for it has arrived
(up to ``max_batch`` streams, least recently served first) and runs one
batched engine step on the model thread, a dedicated one-thread pool.
Results come back on the reactor thread.  At most one step is in flight.  A
step starts on the reactor's turn after one in which audio completed a
chunk while the model was idle (so that every chunk that turn's reads
complete is in it), and as soon as the step before it finishes; a
``LoopingCall`` tick is only the backstop.  It ticks every 100 ms: every
wakeup of the reactor thread costs CPU that the model's threads would have
had (at 10 ms, the ticks took a fifth of the reactor's CPU at 18 streams).
"""

from twisted.application import service
from twisted.internet import defer, task
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool


class DecodeLoop(service.Service):

    log = Logger()

    def __init__(self, engine, registry, reactor, interval=0.1, max_batch=None,
                 run_step=None):
        """engine: the model to decode with, or None until it is loaded (the
        registry refuses streams meanwhile).  run_step(function, chunks) ->
        Deferred runs a step off the reactor thread; by default on the loop's
        own one-thread pool."""
        self.engine = engine
        #: The written forms of utterances (parakeet.server.itn), if served.
        self.itn = None
        self.registry = registry
        self.reactor = reactor
        self.interval = interval
        self.max_batch = max_batch or registry.capacity
        self.pool = None
        if run_step is None:
            self.pool = ThreadPool(1, 1, "parakeet-model")
            run_step = lambda f, *args: deferToThreadPool(reactor, self.pool, f, *args)
        self._run_step = run_step
        self._loop = LoopingCall(self._tick)
        self._loop.clock = reactor
        self._in_flight = None
        self._wake = None
        self.steps = 0

    @property
    def busy(self):
        return self._in_flight is not None

    def startService(self):
        service.Service.startService(self)
        if self.pool is not None:
            self.pool.start()
        self._loop.start(self.interval, now=False)

    @defer.inlineCallbacks
    def stopService(self):
        service.Service.stopService(self)
        if self._loop.running:
            self._loop.stop()
        if self._wake is not None:
            self._wake.cancel()
            self._wake = None
        while self._in_flight is not None:
            yield self._in_flight
        if self.pool is not None:
            self.pool.stop()

    @defer.inlineCallbacks
    def drain(self, seconds):
        """Take no new streams, finalize every open one and decode it to its
        end; streams still not done after ``seconds`` end with an error."""
        self.registry.closed = True
        started = self.reactor.seconds()
        streams = self.registry.in_turn()
        if not streams:
            return
        self.log.info("shutting down: finalizing {n} open streams", n=len(streams))
        for stream in streams:
            stream.listener.end_stream(
                "shutdown", "the server is shutting down: the stream was finalized")
        while len(self.registry) and self.reactor.seconds() - started < seconds:
            yield task.deferLater(self.reactor, 0.02, lambda: None)
        left = self.registry.in_turn()
        if left:
            self.log.warn("{n} streams were not decoded to their end within "
                          "--drain-seconds={seconds}", n=len(left), seconds=seconds)
            while self._in_flight is not None:
                yield self._in_flight
            # The step that was in flight may have ended some of them.
            left = [stream for stream in left if stream in self.registry]
            for stream in left:
                stream.end_reason = "drain-timeout"
                self.registry.release(stream)
                stream.listener.stream_failed(
                    stream, "the server shut down before the stream was decoded to its "
                            "end (--drain-seconds=%g)" % (seconds,))
            yield self._run_step(self.engine.abort, [s.id for s in left])
        self.log.info("drained {n} streams in {duration:.2f} s", n=len(streams),
                      duration=self.reactor.seconds() - started)

    def _tick(self):
        try:
            self.step()
        except Exception:
            self.log.failure("decode loop tick failed")

    def wake(self):
        """Step on the reactor's next turn, once it has handed on every read
        of this one; any number of calls before then make one step."""
        if self._wake is None and self._in_flight is None:
            self._wake = self.reactor.callLater(0, self._woken)

    def _woken(self):
        self._wake = None
        if self.running:
            self._tick()

    def _collect(self):
        streams, chunks = [], []
        for stream in self.registry.in_turn():
            if len(chunks) >= self.max_batch:
                break
            chunk = stream.cutter.next_chunk()
            if chunk is not None:
                streams.append(stream)
                chunks.append(chunk)
        return streams, chunks

    def step(self):
        """Start a model step if none is running and some stream has a chunk ready."""
        if self._in_flight is not None:
            return
        streams, chunks = self._collect()
        if not chunks:
            return
        now = self.reactor.seconds()
        ready = []
        for stream in streams:
            self.registry.served(stream)
            ready.append(stream.chunk_taken(now))
        self.steps += 1
        # Assigned before the callbacks: a synchronous run_step fires at once.
        self._in_flight = self._run_step(self.engine.step, chunks)
        self._in_flight.addCallbacks(self._deliver, self._failed,
                                     callbackArgs=(streams, chunks, now, ready),
                                     errbackArgs=(streams,))
        self._in_flight.addBoth(self._finished)

    def _deliver(self, results, streams, chunks, started, ready):
        done = self.reactor.seconds()
        decoded = 0
        for stream, chunk, result in zip(streams, chunks, results):
            decoded += chunk.audio_samples - stream.decoded_samples
            stream.decoded_samples = chunk.audio_samples
            if result.is_last:
                self.registry.release(stream)
            try:
                stream.listener.stream_result(stream, result)
            except Exception:
                self.log.failure("delivering a result of stream {stream_id} failed",
                                 stream_id=stream.id)
        try:
            self.registry.metrics.decoded(
                len(chunks), done - started, decoded / self.registry.geometry.sample_rate,
                ready, self.reactor.seconds())
        except Exception:
            self.log.failure("counting a decode step failed")

    def _failed(self, failure, streams):
        self.log.failure("decoding step failed for streams {stream_ids}", failure,
                         stream_ids=[s.id for s in streams])
        for stream in streams:
            # However it was ending, it ends with the error.
            stream.end_reason = "engine error"
            self.registry.release(stream)
            stream.listener.stream_failed(stream, "decoding failed: %s"
                                          % (failure.getErrorMessage(),))

    def _finished(self, _):
        self._in_flight = None
        if self.running:
            self.reactor.callLater(0, self._tick)
