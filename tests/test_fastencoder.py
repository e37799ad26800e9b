"""
The accelerated cache-aware streaming step (:mod:`parakeet.engine.nemo.fastencoder`)
against NeMo's own, on the tiny replica.

Tolerance: in float32, encoder outputs agree within 1e-5 absolute plus 1e-5
relative (``torch.testing.assert_close(rtol=1e-5, atol=1e-5)``; the tiny
model's outputs are of order 1 and differ by about 1e-6).  Token ids agree
exactly.
"""

import contextlib
import copy
import os

import attr
import torch
from twisted.trial import unittest

from parakeet.contract import ChunkCutter
from parakeet.engine.engine import Engine
from parakeet.engine.nemo import fastencoder
from parakeet.measuring.replica import ARCHITECTURES, build_replica

from .support.models import (
    assert_engine_idle, shared_tiny_engine, speechlike, staggered_batches, tiny_model_path)

TOLERANCE = dict(rtol=1e-5, atol=1e-5)

_stock = {}


def stock_engine():
    """An engine on NeMo's own streaming step, shared by this module."""
    if "engine" not in _stock:
        _stock["engine"] = Engine.load(tiny_model_path(), device="cpu", num_slots=16,
                                       batch_size=16, fast_encoder=False)
    return _stock["engine"]


def encoder_of(engine):
    return engine.pipeline.asr_model.asr_model.encoder


def encoder_pair():
    """Fresh (stock, accelerated) copies of the tiny model's encoder, free to
    be modified by a test."""
    stock = copy.deepcopy(encoder_of(stock_engine()))
    fast = copy.deepcopy(stock)
    result = fastencoder.accelerate(fast)
    assert result, result.reason
    return stock, fast


@contextlib.contextmanager
def recorded_encoder_outputs(engine):
    """Collect what the encoder outputs for each stream in every streaming
    step engine runs: a list with a dict {stream id: encoded frames} per
    encoder call."""
    encoder = encoder_of(engine)
    manager = engine.pipeline.context_manager
    step, get_context = encoder.cache_aware_stream_step, manager.get_context
    rows, outputs = [], []

    def recording_rows(stream_ids):
        rows[:] = stream_ids
        return get_context(stream_ids)

    def recording(*args, **kwargs):
        result = step(*args, **kwargs)
        encoded, lengths = result[:2]
        outputs.append({stream_id: encoded[i, :, :lengths[i]].clone()
                        for i, stream_id in enumerate(rows)})
        return result

    encoder.cache_aware_stream_step = recording
    manager.get_context = recording_rows
    try:
        yield outputs
    finally:
        del encoder.cache_aware_stream_step
        del manager.get_context


def run_schedule(engine, starts, seconds, seed=0):
    """Streams starting at the given ticks (160 ms of audio each), decoded in
    batches of whatever is ready: the tokens of each stream, the encoder
    output of each stream in every step, and the kinds of chunk each step
    held."""
    audios = [speechlike(seed + i, s) for i, s in enumerate(seconds)]
    cutters = [ChunkCutter(i + 1, engine.geometry) for i in range(len(audios))]
    tokens = [[] for _ in audios]
    kinds = []
    steps = []
    with recorded_encoder_outputs(engine) as outputs:
        for chunks in staggered_batches(cutters, audios, starts):
            kinds.append({(c.is_first, c.is_last) for c in chunks})
            for result in engine.step(chunks):
                tokens[result.stream_id - 1] += result.token_ids
            steps.append({k: v for call in outputs for k, v in call.items()})
            del outputs[:]
    return tokens, steps, kinds


def stream_steps(encoder, n_steps=8, batch=3, lengths=None, caches=None, seed=0):
    """Drive encoder through cache-aware steps of varying chunk size (1 to 4
    new frames) on random features: the outputs of each step and the caches
    after the last."""
    dtype = next(encoder.parameters()).dtype
    if caches is None:
        caches = encoder.get_initial_cache_state(batch, dtype=dtype)
    generator = torch.Generator().manual_seed(seed)
    sizes = [9, 25, 17, 33, 25, 41, 25, 12][:n_steps]
    outputs = []
    with torch.inference_mode():
        for i, n_frames in enumerate(sizes):
            feats = torch.randn(batch, encoder._feat_in, n_frames, generator=generator)
            length = torch.full((batch,), n_frames) if lengths is None else lengths(n_frames)
            result = encoder.cache_aware_stream_step(
                feats.to(dtype), length, *caches, keep_all_outputs=True,
                drop_extra_pre_encoded=0 if i == 0 else 2)
            outputs.append(result[0])
            caches = result[2:]
    return outputs, caches


def frame_major(encoder, cache):
    """An accelerated channel cache as [L, B, C, 2 D]: each frame's key then
    value (the cache holds them head-major)."""
    layers, batch, cache_len, width = cache.shape
    heads = encoder.layers[0].self_attn.h
    blocks = cache.view(layers, batch, 2, heads, cache_len, width // (2 * heads))
    return blocks.permute(0, 1, 4, 2, 3, 5).reshape(cache.shape)


def head_major(encoder, frames):
    """The inverse of frame_major."""
    layers, batch, cache_len, width = frames.shape
    heads = encoder.layers[0].self_attn.h
    blocks = frames.view(layers, batch, cache_len, 2, heads, width // (2 * heads))
    return blocks.permute(0, 1, 3, 4, 2, 5).reshape(frames.shape)


def assert_same_decoding(test, fast, stock, starts, seconds, seed):
    """The accelerated engine fast decodes a schedule (as run_schedule) to
    the tokens and encoder outputs of stock, NeMo's own step; the kinds of
    chunk, (is_first, is_last), of each step."""
    fast_tokens, fast_outputs, kinds = run_schedule(fast, starts, seconds, seed)
    stock_tokens, stock_outputs, _ = run_schedule(stock, starts, seconds, seed)
    test.assertEqual(fast_tokens, stock_tokens)
    test.assertGreater(sum(map(len, stock_tokens)), 0)
    test.assertEqual(len(fast_outputs), len(stock_outputs))
    for fast_step, stock_step in zip(fast_outputs, stock_outputs):
        test.assertEqual(sorted(fast_step), sorted(stock_step))
        for stream_id in stock_step:
            torch.testing.assert_close(fast_step[stream_id], stock_step[stream_id],
                                       **TOLERANCE)
    return kinds


class EngineTests(unittest.TestCase):
    """The server's engine decodes the same with and without acceleration."""

    def setUp(self):
        self.fast = shared_tiny_engine()
        self.stock = stock_engine()

    def tearDown(self):
        assert_engine_idle(self, self.fast)
        assert_engine_idle(self, self.stock)

    def test_accelerated_by_default(self):
        fast_cache = self.fast.pipeline.context_manager.cache_last_channel
        stock_cache = self.stock.pipeline.context_manager.cache_last_channel
        self.assertEqual(fast_cache.shape[:3], stock_cache.shape[:3])
        self.assertEqual(fast_cache.size(-1), 2 * stock_cache.size(-1))
        self.assertIn("_streaming_step", vars(encoder_of(self.fast)))
        self.assertNotIn("_streaming_step", vars(encoder_of(self.stock)))

    def assertSameDecoding(self, starts, seconds, seed=0):
        """Returns the kinds of chunk, (is_first, is_last), of each step."""
        return assert_same_decoding(self, self.fast, self.stock, starts, seconds, seed)

    def test_streams_starting_and_ending_at_different_times(self):
        kinds = self.assertSameDecoding([0, 0, 1, 2, 3], [1.2, 0.4, 0.9, 0.6, 1.0], seed=10)
        # First, middle and last chunks of different streams in one step.
        self.assertIn({(True, False), (False, False), (False, True)}, kinds)

    def test_streams_in_lockstep(self):
        self.assertSameDecoding([0] * 4, [0.8] * 4, seed=20)

    def test_one_stream(self):
        self.assertSameDecoding([0], [1.5], seed=30)

    def test_streams_of_one_chunk(self):
        kinds = self.assertSameDecoding([1, 1, 0, 3], [0.05, 0.2, 0.7, 0.06], seed=40)
        # Streams whose first chunk is also their last, beside longer ones.
        self.assertTrue(any((True, True) in step and len(step) > 1 for step in kinds))


class EncoderTests(unittest.TestCase):
    """The accelerated encoder step itself, against NeMo's."""

    def assertSameSteps(self, stock, fast, **kwargs):
        stock_outputs, stock_caches = stream_steps(stock, **kwargs)
        fast_outputs, fast_caches = stream_steps(fast, **kwargs)
        for fast_output, stock_output in zip(fast_outputs, stock_outputs):
            torch.testing.assert_close(fast_output, stock_output, **TOLERANCE)
        return stock_caches, fast_caches

    def test_caches_hold_keys_and_values(self):
        stock, fast = encoder_pair()
        stock_caches, fast_caches = self.assertSameSteps(stock, fast)
        channel_len = stock_caches[2]
        torch.testing.assert_close(fast_caches[2], channel_len, rtol=0, atol=0)
        torch.testing.assert_close(fast_caches[1], stock_caches[1], **TOLERANCE)
        # Where filled, the cache holds the keys and values of NeMo's cached inputs.
        expected = fastencoder.kv_cache_from_inputs(stock, stock_caches[0])
        filled = int(channel_len.min())
        self.assertGreater(filled, 0)
        torch.testing.assert_close(frame_major(fast, fast_caches[0])[:, :, -filled:],
                                   frame_major(fast, expected)[:, :, -filled:],
                                   **TOLERANCE)

    def test_caches_written_in_place(self):
        stock, fast = encoder_pair()
        in_place = copy.deepcopy(stock)
        self.assertTrue(fastencoder.accelerate(in_place, caches_in_place=True))
        expected_outputs, expected_caches = stream_steps(fast)
        caches = in_place.get_initial_cache_state(3)
        outputs, final = stream_steps(in_place, caches=caches)
        for output, expected in zip(outputs, expected_outputs):
            self.assertTrue(torch.equal(output, expected))
        for cache, expected in zip(final, expected_caches):
            self.assertTrue(torch.equal(cache, expected))
        # The channel and time caches given are the ones returned, updated.
        for returned, given in zip(final[:2], caches[:2]):
            self.assertEqual(returned.data_ptr(), given.data_ptr())
            self.assertTrue(torch.equal(returned, given))
        self.assertGreater(caches[0].abs().max().item(), 0)

    def test_partly_filled_caches(self):
        # Streams with 0, 13 and 70 frames of context, arbitrary values in
        # the unfilled part of the cache, and a shorter third stream.
        stock, fast = encoder_pair()
        channel, time, _ = stock.get_initial_cache_state(3)
        generator = torch.Generator().manual_seed(1)
        channel.normal_(generator=generator)
        time.normal_(generator=generator)
        channel_len = torch.tensor([0, 13, 70])
        kv = fastencoder.kv_cache_from_inputs(stock, channel)

        def lengths(n_frames):
            return torch.tensor([n_frames, n_frames, max(1, n_frames - 8)])

        stock_outputs, _ = stream_steps(stock, caches=(channel, time, channel_len),
                                        lengths=lengths)
        fast_outputs, _ = stream_steps(fast, caches=(kv, time, channel_len), lengths=lengths)
        for fast_output, stock_output in zip(fast_outputs, stock_outputs):
            torch.testing.assert_close(fast_output, stock_output, **TOLERANCE)
        # What the unfilled positions hold does not matter.
        frames = frame_major(fast, kv)
        frames[:, 0] = 1e3
        frames[:, 1, :-13].normal_(generator=generator)
        scrambled = head_major(fast, frames)
        self.assertFalse(torch.equal(scrambled, kv))
        scrambled_outputs, _ = stream_steps(fast, caches=(scrambled, time, channel_len),
                                            lengths=lengths)
        for scrambled_output, fast_output in zip(scrambled_outputs, fast_outputs):
            torch.testing.assert_close(scrambled_output, fast_output, **TOLERANCE)

    def test_initial_state(self):
        _, encoder = encoder_pair()
        channel, time, channel_len = encoder.get_initial_cache_state(2)
        self.assertEqual(channel.shape, (len(encoder.layers), 2,
                                         encoder.streaming_cfg.last_channel_cache_size,
                                         2 * encoder.d_model))
        self.assertEqual(channel.abs().max().item(), 0)
        self.assertEqual(channel_len.tolist(), [0, 0])
        channel, _, _ = encoder.get_initial_cache_state(2, max_dim=8)
        self.assertEqual(channel.size(-1), 2 * encoder.d_model)

    def test_position_memo_follows_geometry(self):
        # Chunks of 1 to 4 new frames, interleaved: each geometry its own entry.
        stock, fast = encoder_pair()
        self.assertSameSteps(stock, fast, batch=1)
        memo = fast._streaming_step.positions
        self.assertEqual(len(memo._entries), 4)
        with torch.inference_mode():
            _, pos_emb = fast.pos_enc(x=torch.zeros(1, 2, fast.d_model), cache_len=70)
            self.assertIs(memo(fast, pos_emb), memo(fast, pos_emb))

    def test_position_memo_follows_the_positional_buffer(self):
        stock, fast = encoder_pair()
        self.assertSameSteps(stock, fast)
        # NeMo extends the buffer by replacing it with a longer one.
        for encoder in (stock, fast):
            encoder.set_max_audio_length(encoder.max_audio_length * 2)
        self.assertSameSteps(stock, fast)
        memo = fast._streaming_step.positions
        self.assertIs(memo._held[0][0], fast.pos_enc.pe)
        # The same buffer, edited in place.
        before, _ = stream_steps(fast)
        for encoder in (stock, fast):
            with torch.no_grad():
                encoder.pos_enc.pe.mul_(3.0)
        self.assertSameSteps(stock, fast)
        after, _ = stream_steps(fast)
        self.assertFalse(torch.allclose(before[-1], after[-1]))
        # Another buffer of the same size.
        for encoder in (stock, fast):
            encoder.pos_enc.pe = encoder.pos_enc.pe.flip(1).clone()
        self.assertSameSteps(stock, fast)

    def test_position_memo_follows_the_weights(self):
        stock, fast = encoder_pair()
        self.assertSameSteps(stock, fast)
        for encoder in (stock, fast):
            with torch.no_grad():
                encoder.layers[-1].self_attn.linear_pos.weight.mul_(-2.0)
        self.assertSameSteps(stock, fast)
        for encoder in (stock, fast):
            attn = encoder.layers[0].self_attn
            attn.linear_pos.weight = torch.nn.Parameter(attn.linear_pos.weight.detach() * 0.5)
        self.assertSameSteps(stock, fast)

    def test_torch_sdpa_attention(self):
        stock, fast = encoder_pair()
        for encoder in (stock, fast):
            for layer in encoder.layers:
                layer.self_attn.use_pytorch_sdpa = True
        self.assertSameSteps(stock, fast)

    def test_bfloat16(self):
        # Rounding to bfloat16 differs between the two; the accelerated step
        # must stay as close to float32 as NeMo's own bfloat16 step is.
        stock, fast = encoder_pair()
        reference, _ = stream_steps(stock)
        stock.to(torch.bfloat16)
        fast.to(torch.bfloat16)
        stock_outputs, _ = stream_steps(stock)
        fast_outputs, _ = stream_steps(fast)
        for exact, stock_output, fast_output in zip(reference, stock_outputs, fast_outputs):
            self.assertEqual(fast_output.dtype, torch.bfloat16)
            stock_error = (stock_output.float() - exact).abs().max().item()
            fast_error = (fast_output.float() - exact).abs().max().item()
            self.assertLessEqual(fast_error, 2 * stock_error + 1e-2)

    def test_caches_of_the_stock_layout_are_refused(self):
        stock, fast = encoder_pair()
        caches = stock.get_initial_cache_state(1)
        with self.assertRaises(ValueError):
            stream_steps(fast, batch=1, caches=caches)


class LongChunkTests(unittest.TestCase):
    """A tiny replica with 560 ms chunks (look-ahead 6: a first chunk of 49
    feature frames, then 9 + 56): first chunks, padded to the others'
    length, still decode beside them as NeMo's own step decodes them apart."""

    def setUp(self):
        if "long" not in _stock:
            path = os.path.abspath("tiny-replica-560ms.nemo")
            if not os.path.exists(path):
                build_replica(attr.evolve(ARCHITECTURES["tiny"], att_context_size=(70, 6)),
                              path)
            _stock["long"] = tuple(
                Engine.load(path, device="cpu", num_slots=8, batch_size=8, fast_encoder=fast)
                for fast in (True, False))
        self.fast, self.stock = _stock["long"]

    def tearDown(self):
        assert_engine_idle(self, self.fast)
        assert_engine_idle(self, self.stock)

    def test_first_chunks_beside_others(self):
        self.assertFalse(self.fast.pipeline.first_chunks_apart)
        self.assertEqual(self.fast.geometry.first_frames, 49)
        kinds = assert_same_decoding(self, self.fast, self.stock, [0, 2, 5, 7],
                                     [2.5, 2.0, 1.2, 0.3], seed=50)
        self.assertTrue(any((True, False) in step and (False, False) in step
                            for step in kinds))


class OfflineTests(unittest.TestCase):
    """Without caches the encoder is NeMo's own, untouched."""

    def test_forward_and_transcribe_unchanged(self):
        fast = shared_tiny_engine().pipeline.asr_model.asr_model
        stock = stock_engine().pipeline.asr_model.asr_model
        generator = torch.Generator().manual_seed(5)
        feats = torch.randn(2, fast.encoder._feat_in, 300, generator=generator)
        length = torch.tensor([300, 170])
        with torch.inference_mode():
            fast_encoded, fast_len = fast.encoder(audio_signal=feats, length=length)
            stock_encoded, stock_len = stock.encoder(audio_signal=feats, length=length)
        self.assertTrue(torch.equal(fast_encoded, stock_encoded))
        self.assertTrue(torch.equal(fast_len, stock_len))
        audio = speechlike(6, 2.5)
        fast_hyp = fast.transcribe([audio], batch_size=1, verbose=False, return_hypotheses=True)[0]
        stock_hyp = stock.transcribe([audio], batch_size=1, verbose=False,
                                     return_hypotheses=True)[0]
        self.assertEqual(fast_hyp.y_sequence.tolist(), stock_hyp.y_sequence.tolist())
        self.assertGreater(len(stock_hyp.y_sequence), 0)

    def test_training_forward_unchanged(self):
        stock, fast = encoder_pair()
        feats = torch.randn(2, fast._feat_in, 200, generator=torch.Generator().manual_seed(7))
        length = torch.tensor([200, 120])
        for encoder in (stock, fast):
            encoder.train()
            torch.manual_seed(0)
            encoded, _ = encoder(audio_signal=feats, length=length)
            encoded.sum().backward()
        self.assertTrue(torch.equal(stock.layers[0].self_attn.linear_k.weight.grad,
                                    fast.layers[0].self_attn.linear_k.weight.grad))


class AccelerateTests(unittest.TestCase):

    def test_idempotent(self):
        _, fast = encoder_pair()
        step = fast._streaming_step
        self.assertTrue(fastencoder.accelerate(fast))
        self.assertIs(fast._streaming_step, step)

    def test_other_models_left_alone(self):
        from nemo.collections.asr.modules import ConformerEncoder

        regular = ConformerEncoder(
            feat_in=16, n_layers=1, d_model=16, n_heads=2, att_context_size=[8, 1],
            att_context_style="regular", conv_context_size="causal", subsampling_factor=4)
        local = ConformerEncoder(
            feat_in=16, n_layers=1, d_model=16, n_heads=2, att_context_size=[8, 8],
            self_attention_model="rel_pos_local_attn", subsampling_factor=4)
        for encoder, word in [(regular, "regular"), (local, "rel_pos_local_attn"),
                              (torch.nn.Linear(2, 2), "ConformerEncoder")]:
            result = fastencoder.accelerate(encoder)
            self.assertFalse(result)
            self.assertIn(word, result.reason)
            self.assertNotIn("forward_internal", vars(encoder))
            self.assertNotIn("get_initial_cache_state", vars(encoder))
