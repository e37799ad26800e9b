"""
Shared test fixtures: a tiny random-weight model of the served family, built
offline once per test run and loaded through the server's own --model path.
"""

import os

import numpy as np

from parakeet.contract import ChunkGeometry

_built = {}

#: The chunk geometry of the FastConformer family at 160 ms chunks.
GEOMETRY = ChunkGeometry(hop=160, n_fft=512, pad=256, first_frames=9,
                         chunk_frames=16, cache_frames=9, sample_rate=16000)


def tiny_model_path():
    """Path of the tiny replica, built on first use in this run."""
    if "tiny" not in _built:
        from parakeet.measuring.replica import build_replica

        path = os.path.abspath("tiny-replica.nemo")
        if not os.path.exists(path):
            build_replica("tiny", path, seed=0)
        _built["tiny"] = path
    return _built["tiny"]


def load_tiny_engine(num_slots=16, batch_size=16):
    from parakeet.engine.engine import Engine

    return Engine.load(tiny_model_path(), device="cpu", num_slots=num_slots,
                       batch_size=batch_size)


def shared_tiny_engine():
    """One engine (16 slots) for the whole run; tests leave it holding nothing."""
    if "engine" not in _built:
        _built["engine"] = load_tiny_engine(num_slots=16, batch_size=16)
    return _built["engine"]


def assert_engine_idle(test, engine):
    """engine holds no stream: every stream it saw has ended."""
    pipeline = engine.pipeline
    test.assertEqual(pipeline._state_pool, {})
    test.assertEqual(pipeline.context_manager.free_slots.qsize(),
                     pipeline.context_manager.num_slots)
    test.assertEqual(engine._feature_cache, {})
    if engine.vad is not None:
        test.assertEqual(len(engine.vad), 0)


def speechlike(seed, seconds):
    """Reproducible audio the tiny model emits varied tokens for."""
    from parakeet.measuring.replica import calibration_audio

    return calibration_audio(seed, seconds)


def quantized(samples):
    """samples as they survive pcm16 on the wire."""
    return np.round(np.clip(samples, -1.0, 32767 / 32768) * 32768) / 32768


def offline_tokens(engine, audio):
    """What the model decodes from the whole utterance at once: (tokens, frames)."""
    tokens, _, frames = engine.decode_offline(audio)
    return tokens, frames


def staggered_batches(cutters, audios, starts, piece=2560):
    """Feed each stream piece samples per tick from its start tick on, and
    yield the chunks ready at each tick, as the decode loop would batch them."""
    tick = 0
    while not all(c.done for c in cutters):
        chunks = []
        for i, cutter in enumerate(cutters):
            offset = (tick - starts[i]) * piece
            if offset >= 0 and not cutter.finished:
                cutter.push(audios[i][offset:offset + piece])
                if offset + piece >= len(audios[i]):
                    cutter.finish()
            chunk = cutter.next_chunk()
            if chunk is not None:
                chunks.append(chunk)
        if chunks:
            yield chunks
        tick += 1
