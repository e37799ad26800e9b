"""
Voice activity detection for many streams at once.

The network is Silero VAD (the ``silero-vad`` package ships it; no
download).  The package's own wrapper keeps one recurrent state inside the
model for one fixed batch, and importing the package sets torch's thread
count for the whole process, so the server loads the network from the
package's data folder and calls its parts with the state passed in and
out: each stream's state (the LSTM state and the last 64 samples it heard)
lives with the stream, so any set of streams can share one batched call.
What comes before the LSTM sees one window at a time, so it runs once for
all the windows of all the streams in a call; the LSTM then steps through
them in order.

The network hears 16 kHz audio in windows of 512 samples (32 ms) and gives
the probability that each window holds speech.

Runs on the model thread.
"""

import importlib.util
import os

import numpy as np
import torch

SAMPLE_RATE = 16000
WINDOW = 512
CONTEXT = 64
WINDOW_MS = WINDOW * 1000 // SAMPLE_RATE


def _load_network(device):
    """The package's TorchScript network (without its stateful wrapper)."""
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("voice activity detection needs the silero-vad package")
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", "silero_vad.jit")
    return torch.jit.load(path, map_location=device)._model


class StreamVAD:
    """One stream's detector state: LSTM state, context, unheard samples."""

    __slots__ = ("state", "context", "pending")

    def __init__(self, device):
        self.state = torch.zeros(2, 128, device=device)
        self.context = np.zeros(CONTEXT, np.float32)
        self.pending = np.zeros(0, np.float32)


class VoiceActivity:
    """Speech probabilities of 32 ms windows, for any set of streams per call."""

    def __init__(self, device="cpu"):
        """device: where the network runs (with the model, so that thousands
        of streams on a GPU do not wait on the CPU)."""
        self.device = torch.device(device)
        self.network = _load_network(self.device)
        self._streams = {}

    def forget(self, stream_ids):
        for sid in stream_ids:
            self._streams.pop(sid, None)

    def __len__(self):
        return len(self._streams)

    def __call__(self, audio):
        """audio: {stream_id: new 16 kHz float32 samples}.  Returns
        {stream_id: speech probabilities of the whole windows completed}
        (a partial window waits for the next call)."""
        rows, owners = [], []
        for sid, samples in audio.items():
            state = self._streams.get(sid)
            if state is None:
                state = self._streams[sid] = StreamVAD(self.device)
            pending = np.concatenate([state.pending, np.asarray(samples, np.float32)])
            n = len(pending) // WINDOW
            windows = []
            context = state.context
            for i in range(n):
                window = pending[i * WINDOW:(i + 1) * WINDOW]
                windows.append(np.concatenate([context, window]))
                context = window[-CONTEXT:]
            state.context = context
            state.pending = pending[n * WINDOW:]
            rows.append(windows)
            owners.append(sid)
        out = {sid: [] for sid in owners}
        depth = max((len(w) for w in rows), default=0)
        if depth == 0:
            return out
        with torch.inference_mode():
            # Everything before the LSTM is per window: one call for all the
            # windows of all the streams; then the LSTM, a window at a time.
            flat = np.stack([window for windows in rows for window in windows])
            features = self.network.encoder(self.network.run_extractors(
                torch.from_numpy(flat).to(self.device)))
            starts = np.cumsum([0] + [len(w) for w in rows])
            for k in range(depth):
                active = [i for i, w in enumerate(rows) if len(w) > k]
                states = [self._streams[owners[i]] for i in active]
                x, state = self.network.decoder(
                    features[[int(starts[i]) + k for i in active]],
                    torch.stack([s.state for s in states], 1))
                for j, (i, probability) in enumerate(
                        zip(active, x.squeeze(1).mean(1).tolist())):
                    states[j].state = state[:, j]
                    out[owners[i]].append(probability)
        return out
