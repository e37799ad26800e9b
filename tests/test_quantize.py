"""
Eight-bit encoder weights (``--precision int8``): close to float32, and a
stream's result independent of the streams it is batched with.
"""

import torch
from twisted.trial import unittest

from parakeet.engine.engine import Engine
from parakeet.engine.quantize import Int8Linear, Int8Pointwise, quantize_encoder

from .support.models import (
    assert_engine_idle, decode_together, speechlike, stream_alone, tiny_model_path, tokens_of)


_int8 = {}


def relative_error(got, expected):
    return float((got - expected).norm() / expected.norm())


class Int8LinearTests(unittest.TestCase):

    def setUp(self):
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(96, 40)
        self.quantized = Int8Linear(self.linear)

    def test_close_to_float(self):
        x = torch.randn(3, 7, 96)
        with torch.inference_mode():
            got, expected = self.quantized(x), self.linear(x)
        self.assertEqual(got.shape, (3, 7, 40))
        self.assertLess(relative_error(got, expected), 0.03)

    def test_rows_are_independent_of_their_batch(self):
        # Rows of very different ranges and offsets: quantized alone or
        # together, each row's output is bitwise the same.
        x = torch.randn(6, 96)
        x[1] *= 1000
        x[2] = x[2] * 1e-3 + 5
        x[3] = 0.25  # constant: all of it is the centre
        with torch.inference_mode():
            together = self.quantized(x)
            alone = torch.cat([self.quantized(x[i:i + 1]) for i in range(6)])
            reordered = self.quantized(x.flip(0)).flip(0)
        self.assertTrue(torch.equal(together, alone))
        self.assertTrue(torch.equal(together, reordered))
        with torch.inference_mode():
            self.assertLess(relative_error(together, self.linear(x)), 0.03)

    def test_pointwise_convolution(self):
        """A width-one convolution, in its own layout and channels-last."""
        conv = torch.nn.Conv1d(96, 40, 1)
        quantized = Int8Pointwise(conv)
        x = torch.randn(3, 96, 7)
        expected = conv(x).detach()
        self.assertLess(relative_error(quantized(x), expected), 0.03)
        self.assertTrue(torch.equal(quantized.channels_last(x.transpose(1, 2)),
                                    quantized(x).transpose(1, 2)))

    def test_without_bias(self):
        linear = torch.nn.Linear(32, 8, bias=False)
        x = torch.randn(4, 32)
        with torch.inference_mode():
            self.assertLess(relative_error(Int8Linear(linear)(x), linear(x)), 0.03)


class Int8EngineTests(unittest.TestCase):

    def setUp(self):
        if "engine" not in _int8:
            _int8["engine"] = Engine.load(tiny_model_path(), device="cpu", num_slots=8,
                                          batch_size=8, precision="int8")
        self.engine = _int8["engine"]

    def tearDown(self):
        assert_engine_idle(self, self.engine)

    def test_encoder_linears_are_quantized(self):
        encoder = self.engine.pipeline.asr_model.asr_model.encoder
        self.assertEqual(self.engine.precision, "int8")
        for layer in encoder.layers:
            attn = layer.self_attn
            for name in ("linear_q", "linear_k", "linear_v", "linear_out"):
                self.assertIsInstance(getattr(attn, name), Int8Linear)
            self.assertIs(type(attn.linear_pos), torch.nn.Linear)
            self.assertIsInstance(layer.feed_forward1.linear1, Int8Linear)
            self.assertIsInstance(layer.conv.pointwise_conv1, Int8Pointwise)
            self.assertIsInstance(layer.conv.pointwise_conv2, Int8Pointwise)
        self.assertEqual(quantize_encoder(encoder), 0)  # nothing left to replace

    def test_batch_invariance(self):
        starts = [0, 1, 1, 3, 4]
        audios = [speechlike(60 + i, s) for i, s in enumerate([1.9, 0.8, 2.4, 1.1, 1.5])]
        audios[1] = audios[1] * 20  # a loud stream beside quiet ones
        alone = [tokens_of(stream_alone(self.engine, a, 100 + i)) for i, a in enumerate(audios)]
        together, sizes = decode_together(self.engine, audios, starts)
        self.assertGreaterEqual(max(sizes), 4)
        self.assertGreater(sum(map(len, alone)), 20)
        self.assertEqual(together, alone)

    def test_unknown_precision_is_refused(self):
        with self.assertRaises(ValueError) as e:
            Engine.load(tiny_model_path(), device="cpu", precision="int4")
        self.assertIn("unknown precision 'int4'", str(e.exception))

    def test_float16_on_the_cpu_is_refused(self):
        # NeMo would run it in float32 while the server reported float16.
        with self.assertRaises(ValueError) as e:
            Engine.load(tiny_model_path(), device="cpu", precision="float16")
        self.assertIn("float16 is for CUDA", str(e.exception))
