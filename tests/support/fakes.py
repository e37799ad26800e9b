"""Fakes for testing one layer at a time."""

from parakeet.contract import StepResult
from parakeet.server.protocol import Channel


class FakeEngine:
    """Decodes each chunk to one token: the number of frames it held, at the
    chunk's last encoder frame; no voice activity detection, no <EOU>."""

    frame_ms = 80
    eou_id = None
    vad = None
    endpointing_ms = 0

    def __init__(self, geometry):
        self.geometry = geometry
        self.batches = []
        self._frames = {}

    def step(self, chunks):
        self.batches.append([c.stream_id for c in chunks])
        results = []
        for c in chunks:
            frames = self._frames.get(c.stream_id, 0) + c.valid_frames
            self._frames[c.stream_id] = frames
            if c.is_last:
                del self._frames[c.stream_id]
            results.append(StepResult(
                c.stream_id, [c.valid_frames], [0.5], " %d" % c.valid_frames, c.is_last,
                frames=[max(0, frames - 1) // 8], pieces=["\u2581%d" % c.valid_frames]))
        return results


class RecordingListener:

    def __init__(self):
        self.results = []
        self.failures = []

    def stream_result(self, stream, result):
        self.results.append((stream.id, result))

    def stream_failed(self, stream, reason):
        self.failures.append((stream.id, reason))


class FakeChannel(Channel):

    def __init__(self, peer="127.0.0.1:5555"):
        self.peer = peer
        self.sent = []
        self.closed = False
        self.aborted = False
        self.paused = set()

    def send(self, message):
        assert not self.closed, "sent after close"
        self.sent.append(message)

    def close(self):
        self.closed = True

    def abort(self):
        self.closed = self.aborted = True

    def pause_reading(self, reason):
        self.paused.add(reason)

    def resume_reading(self, reason):
        self.paused.discard(reason)

    def of_type(self, kind):
        return [m for m in self.sent if m["type"] == kind]


class FakeLoop:

    def __init__(self, engine=None, itn=None):
        self.engine = engine or FakeEngine(None)
        self.itn = itn
        self.steps = 0
        self.busy = False

    def wake(self):
        if not self.busy:
            self.steps += 1
