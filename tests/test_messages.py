import base64
import json

import numpy as np
from twisted.trial import unittest

from parakeet.server import messages
from parakeet.server.registry import ModelInfo
from .support.servers import audio_json


class RejectsMixin:

    def assertRejected(self, raw, fragment):
        with self.assertRaises(messages.ProtocolError) as caught:
            messages.parse(raw)
        self.assertIn(fragment, str(caught.exception))


class ParseTests(RejectsMixin, unittest.TestCase):

    def test_ping_and_close(self):
        self.assertIsInstance(messages.parse(b'{"type":"ping"}'), messages.Ping)
        self.assertIsInstance(messages.parse('{"type": "close"}'), messages.Close)

    def test_pcm16_audio(self):
        samples = np.array([0.0, 0.5, -0.5, -1.0], dtype=np.float32)
        message = messages.parse(audio_json(samples, final=True))
        self.assertEqual(message.final, True)
        np.testing.assert_array_equal(message.samples, samples)

    def test_f32_audio(self):
        samples = np.array([0.1, -0.25, 0.999], dtype=np.float32)
        message = messages.parse(audio_json(samples, encoding="f32"))
        self.assertEqual(message.final, False)
        np.testing.assert_array_equal(message.samples, samples)

    def test_encoding_defaults_to_pcm16(self):
        message = messages.parse('{"type":"audio","data":"AAD/fw=="}')
        np.testing.assert_array_equal(message.samples, [0.0, 32767 / 32768])

    def test_final_without_data(self):
        message = messages.parse('{"type":"audio","final":true}')
        self.assertEqual(len(message.samples), 0)
        self.assertTrue(message.final)

    def test_errors(self):
        cases = [
            (b"\xff\xfe{", "not valid UTF-8"),
            ("{not json", "invalid JSON"),
            ("[1, 2]", "must be a JSON object"),
            ('"audio"', "must be a JSON object"),
            ("{}", "unknown message type"),
            ('{"type": 3}', "unknown message type"),
            ('{"type": "dance"}', "unknown message type: 'dance'"),
            ('{"type":"audio","data":"!!!"}', "not valid base64"),
            ('{"type":"audio","data":12}', "'data' must be a base64 string"),
            ('{"type":"audio","data":"","encoding":"mp3"}', "unknown audio encoding 'mp3'"),
            ('{"type":"audio","data":"","encoding":7}', "'encoding' must be a string"),
            ('{"type":"audio","data":"AAAA","final":"yes"}', "'final' must be true or false"),
            ('{"type":"audio","data":"AAAA"}', "even number of bytes"),
            ('{"type":"audio","data":"AAAAAAA=","encoding":"f32"}', "multiple of 4 bytes"),
            ("[" * 100000, "invalid JSON"),
        ]
        for raw, fragment in cases:
            self.assertRejected(raw, fragment)

    def test_non_finite_f32(self):
        for bad in (np.nan, np.inf, -np.inf):
            samples = np.array([0.0, bad], dtype=np.float32)
            self.assertRejected(audio_json(samples, encoding="f32"), "NaN or infinite")

    def test_f32_out_of_range(self):
        # pcm16 values sent as f32, say: refused before they reach the model.
        samples = np.array([0.0, 1200.0, -3.0], dtype=np.float32)
        self.assertRejected(audio_json(samples, encoding="f32"),
                            "f32 audio must lie in [-1, 1]: got a sample of magnitude 1.2e+03")
        edge = np.array([2.0, -2.0, 1.5], dtype=np.float32)
        np.testing.assert_array_equal(
            messages.parse(audio_json(edge, encoding="f32")).samples, edge)


class BuildTests(unittest.TestCase):

    def test_result_shape(self):
        obj = json.loads(messages.encode(
            messages.result(7, "hi", [1, 2], [0.5, 1.0], True, 1234.5)))
        self.assertEqual(obj, {"type": "result", "stream_id": 7, "text": "hi",
                               "token_ids": [1, 2], "confidence_scores": [0.5, 1.0],
                               "is_final": True, "audio_ms": 1234.5})

    def test_others(self):
        self.assertEqual(messages.hello(3, 16000),
                         {"type": "hello", "stream_id": 3, "sample_rate": 16000})
        model = ModelInfo("demo", "cpu", "float32", 160, [160], 16000)
        info = {"name": "demo", "device": "cpu", "precision": "float32", "chunk_ms": 160,
                "chunk_sizes_ms": [160], "sample_rate": 16000, "languages": ["en"],
                "language": "en"}
        self.assertEqual(messages.hello(3, 16000, model),
                         {"type": "hello", "stream_id": 3, "sample_rate": 16000,
                          "model": "demo", "model_info": info})
        self.assertEqual(messages.status(2, 8, "ready"),
                         {"type": "status", "connected_streams": 2, "max_streams": 8,
                          "state": "ready"})
        self.assertEqual(messages.status(2, 8, "ready", model)["model_info"], info)
        self.assertEqual(messages.error("x"), {"type": "error", "message": "x"})
        self.assertEqual(messages.pong(), {"type": "pong"})
        self.assertEqual(messages.encode({"type": "pong"}), b'{"type":"pong"}')


class TurnMessageTests(RejectsMixin, unittest.TestCase):
    """config, flush, and the sample rate an audio message may declare."""

    def test_flush(self):
        self.assertEqual(messages.parse('{"type":"flush"}'), messages.Flush())

    def test_config(self):
        self.assertEqual(messages.parse('{"type":"config","sample_rate":48000}'),
                         messages.Config(48000, None))
        self.assertEqual(messages.parse('{"type":"config","encoding":"mulaw",'
                                        '"sample_rate":8000}'),
                         messages.Config(8000, "mulaw"))
        self.assertEqual(messages.parse('{"type":"config"}'), messages.Config())
        self.assertRejected('{"type":"config","sample_rate":96000}',
                            "sample_rate must be a whole number of Hz from 8000 to 48000, "
                            "got 96000")
        self.assertRejected('{"type":"config","sample_rate":"16k"}', "sample_rate")
        self.assertRejected('{"type":"config","encoding":"opus"}',
                            "unknown audio encoding 'opus'")
        self.assertRejected('{"type":"config","encoding":7}', "'encoding' must be a string")

    def test_config_results(self):
        self.assertEqual(messages.parse('{"type":"config","results":"every_chunk"}'),
                         messages.Config(results="every_chunk"))
        self.assertEqual(messages.parse('{"type":"config","results":"tokens"}'),
                         messages.Config(results="tokens"))
        self.assertRejected('{"type":"config","results":"always"}',
                            "unknown 'results' \"always\" (expected one of: tokens, "
                            "every_chunk)")
        self.assertRejected('{"type":"config","results":[1]}', "unknown 'results' [1]")

    def test_audio_sample_rate(self):
        message = messages.parse(json.dumps({"type": "audio", "sample_rate": 8000,
                                             "data": ""}))
        self.assertEqual(message.sample_rate, 8000)
        self.assertIsNone(messages.parse(audio_json(np.zeros(2))).sample_rate)
        self.assertRejected('{"type":"audio","sample_rate":4000,"data":""}', "sample_rate")

    def test_default_encoding(self):
        # Audio that names no encoding is taken in the one the stream set.
        payload = base64.b64encode(bytes([0xff, 0x00])).decode()
        raw = json.dumps({"type": "audio", "data": payload})
        self.assertEqual(len(messages.parse(raw).samples), 1)  # pcm16
        self.assertEqual(len(messages.parse(raw, "mulaw").samples), 2)

    def test_result_turn_fields(self):
        turn = {"turn_detection": "pause", "last_state": "silence"}
        message = messages.result(3, "hi", [1], [0.5], False, 80.0, turn)
        self.assertEqual((message["turn_detection"], message["last_state"]),
                         ("pause", "silence"))
        self.assertNotIn("turn_detection", messages.result(3, "hi", [1], [0.5], False, 80.0))
