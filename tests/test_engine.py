"""
The engine on a real (tiny, random-weight) cache-aware model, through the
NeMo pipeline and the same loading path as ``--model``.
"""

from twisted.trial import unittest

from parakeet.contract import ChunkCutter

from .support.models import (
    assert_engine_idle, decode_together, offline_tokens, shared_tiny_engine, speechlike,
    stream_alone, tokens_of)


class EngineTests(unittest.TestCase):

    def setUp(self):
        self.engine = shared_tiny_engine()

    def tearDown(self):
        # Every stream ran to its last chunk, so the engine holds nothing.
        assert_engine_idle(self, self.engine)

    def test_geometry(self):
        g = self.engine.geometry
        self.assertEqual((g.hop, g.n_fft, g.first_frames, g.chunk_frames, g.cache_frames),
                         (160, 512, 9, 16, 9))
        self.assertEqual(self.engine.sample_rate, 16000)

    def test_streaming_matches_offline(self):
        # Lengths around the first chunk, the chunk grid and in between; the
        # pieces the audio arrives in never line up with chunks.
        for seconds, piece in [(0.01, 7), (0.096, 500), (0.1, 333), (0.256, 1000),
                               (1.0, 2560), (2.0, 4000), (2.05, 777), (3.33, 1601)]:
            audio = speechlike(int(seconds * 1000), seconds)
            expected, _ = offline_tokens(self.engine, audio)
            got = tokens_of(stream_alone(self.engine, audio, 1, piece))
            self.assertEqual(got, expected, "%.3f s in pieces of %d" % (seconds, piece))
        # Not trivially equal: the model emits, and what depends on the audio.
        self.assertGreater(len(set(expected)), 3)
        other, _ = offline_tokens(self.engine, speechlike(1, 3.33))
        self.assertNotEqual(other, expected)

    def test_audio_shorter_than_a_frame(self):
        # 10 ms of audio holds no complete feature frame: the featurizer gives
        # the encoder a zero-length input.  Offline decoding still runs the
        # encoder over its padding; the server decodes nothing, by design.
        audio = speechlike(5, 0.009)
        _, frames = offline_tokens(self.engine, audio)
        self.assertEqual(frames, 0)
        results = stream_alone(self.engine, audio, 1)
        self.assertEqual(len(results), 1)
        self.assertEqual((results[0].token_ids, results[0].is_last), ([], True))

    def test_batch_invariance(self):
        # Eight streams of different lengths start and end at different
        # times; each is decoded in batches of whatever is ready.
        starts = [0, 0, 1, 2, 3, 5, 6, 8]
        lengths = [2.3, 0.7, 3.1, 1.05, 2.6, 0.3, 1.9, 1.2]
        audios = [speechlike(40 + i, s) for i, s in enumerate(lengths)]
        alone = [tokens_of(stream_alone(self.engine, a, 100 + i))
                 for i, a in enumerate(audios)]
        together, sizes = decode_together(self.engine, audios, starts)
        self.assertGreaterEqual(max(sizes), 6)
        for i in range(8):
            self.assertEqual(together[i], alone[i], "stream %d" % i)

    def test_first_and_last_chunks_share_the_encoder_call(self):
        """A step holding streams' first and last chunks beside others runs
        the encoder once."""
        encoder = self.engine.pipeline.asr_model.asr_model.encoder
        calls = []
        step = encoder.cache_aware_stream_step

        def counted(*args, **kwargs):
            calls.append(kwargs["processed_signal"].shape[0])
            return step(*args, **kwargs)

        self.patch(encoder, "cache_aware_stream_step", counted)
        cutters = [ChunkCutter(60 + i, self.engine.geometry) for i in range(5)]
        for i, cutter in enumerate(cutters):
            cutter.push(speechlike(60 + i, 0.5 if i < 2 else 0.7))
        for cutter in cutters[:4]:
            self.engine.step([cutter.next_chunk()])  # the first chunks
        for cutter in cutters[:2]:
            cutter.finish()
        for _ in range(20):
            del calls[:]
            chunks = [c for c in (cutter.next_chunk() for cutter in cutters[:4]) if c is not None]
            if any(c.is_last for c in chunks):
                # The fifth stream starts beside them.
                chunks.append(cutters[4].next_chunk())
                self.assertEqual({(c.is_first, c.is_last) for c in chunks},
                                 {(True, False), (False, False), (False, True)})
                self.engine.step(chunks)
                self.assertEqual(calls, [len(chunks)])
                break
            self.engine.step(chunks)
        else:
            self.fail("the short streams never reached their last chunks")
        for cutter in cutters:
            cutter.finish()
            while not cutter.done:
                self.engine.step([cutter.next_chunk()])

    def test_results(self):
        audio = speechlike(7, 2.0)
        results = stream_alone(self.engine, audio, 1)
        tokens = tokens_of(results)
        self.assertEqual([r.is_last for r in results], [False] * (len(results) - 1) + [True])
        for r in results:
            self.assertEqual(len(r.confidences), len(r.token_ids))
            for c in r.confidences:
                self.assertTrue(0.0 <= c <= 1.0, c)
        text = "".join(r.text for r in results)
        tokenizer = self.engine.pipeline.tokenizer
        self.assertEqual(text.split(), tokenizer.ids_to_text(tokens).split())

    def test_results_carry_frames_pieces_and_voice_activity(self):
        audio = speechlike(8, 2.0)
        results = stream_alone(self.engine, audio, 1, piece=2000)
        tokens, frames, _ = self.engine.decode_offline(audio)
        # The frame of every token is the one offline decoding gives it.
        self.assertEqual([f for r in results for f in r.frames], frames)
        self.assertEqual(tokens_of(results), tokens)
        pieces = self.engine.pipeline.tokenizer.ids_to_tokens(tokens)
        self.assertEqual([p for r in results for p in r.pieces], pieces)
        # Every whole 32 ms window of the stream is heard once.
        speech = [p for r in results for p in r.speech]
        self.assertEqual(len(speech), len(audio) // 512)
        self.assertTrue(all(0.0 <= p <= 1.0 for p in speech))
        self.assertEqual((self.engine.frame_ms, self.engine.eou_id),
                         (80, self.engine.pipeline.asr_model.tokenizer.token_to_id("<EOU>")))

    def test_endpointing_history_is_long_enough_to_fire(self):
        # NeMo asks for more blank frames than its history holds; the
        # serving pipeline's history holds one more, so it can fire.
        from nemo.collections.asr.inference.streaming.framing.request_options import (
            ASRRequestOptions)

        pipeline = self.engine.pipeline
        state = pipeline.create_state(ASRRequestOptions(stop_history_eou=800))
        self.assertEqual(state.label_buffer_size, 11)
        blanks = state.get_label_buffer()
        self.assertEqual(pipeline.endpointer.detect_eou_near_pivot(
            blanks, len(blanks) - 1, stop_history_eou=800), (True, 5))
        self.assertEqual(pipeline.create_state(ASRRequestOptions()).label_buffer_size, 0)

    def test_control_tokens_stay_out_of_text(self):
        tokenizer = self.engine.pipeline.tokenizer
        eou = tokenizer.tokens_to_ids(["<EOU>"])[0]
        word = tokenizer.text_to_ids("ab")
        self.assertEqual(self.engine.text_of([eou]), "")
        self.assertEqual(self.engine.text_of(word + [eou] + word).split(),
                         [tokenizer.ids_to_text(word)] * 2)

    def test_failed_step_frees_its_streams(self):
        # A step that raises (say, CUDA out of memory) leaves no state, slot or
        # feature cache behind for the streams of its batch.
        engine = self.engine
        audio = speechlike(3, 1.0)
        cutters = [ChunkCutter(sid, engine.geometry) for sid in (1, 2)]
        for cutter in cutters:
            cutter.push(audio)
        engine.step([c.next_chunk() for c in cutters])
        self.assertEqual(len(engine.pipeline._state_pool), 2)
        model = engine.pipeline.asr_model

        def out_of_memory(*args, **kwargs):
            raise RuntimeError("CUDA out of memory")

        model.stream_step = out_of_memory
        try:
            with self.assertRaises(RuntimeError):
                engine.step([c.next_chunk() for c in cutters])
        finally:
            del model.stream_step
        assert_engine_idle(self, engine)
        # The engine carries on, and decodes as before.
        self.assertEqual(tokens_of(stream_alone(engine, audio, 3)),
                         offline_tokens(engine, audio)[0])
