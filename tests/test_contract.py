import numpy as np
from twisted.trial import unittest

from parakeet.contract import ChunkCutter

from .support.models import GEOMETRY

G = GEOMETRY


def cut_all(samples, piece=None, finish=True):
    cutter = ChunkCutter(1, G)
    chunks = []
    piece = piece or len(samples) or 1
    for i in range(0, len(samples), piece):
        cutter.push(samples[i:i + piece])
        while (chunk := cutter.next_chunk()) is not None:
            chunks.append(chunk)
    if finish:
        cutter.finish()
        while (chunk := cutter.next_chunk()) is not None:
            chunks.append(chunk)
    return cutter, chunks


class GeometryTests(unittest.TestCase):

    def test_numbers(self):
        self.assertEqual(G.margin, 320)
        self.assertEqual(G.frames_for(16000), 100)
        self.assertEqual(G.frames_for(159), 0)
        self.assertEqual(G.frames_for(160), 1)
        self.assertEqual(G.frames_for(0), 0)
        self.assertEqual(G.samples_needed(0), 8 * 160 - 256 + 512)
        self.assertEqual(G.samples_needed(9), 24 * 160 - 256 + 512)
        self.assertAlmostEqual(G.chunk_seconds, 0.16)


class ChunkCutterTests(unittest.TestCase):

    def test_first_chunk_waits_for_its_audio(self):
        cutter = ChunkCutter(1, G)
        cutter.push(np.zeros(G.samples_needed(0) - 1, np.float32))
        self.assertFalse(cutter.ready)
        self.assertIsNone(cutter.next_chunk())
        cutter.push(np.zeros(1, np.float32))
        self.assertTrue(cutter.ready)
        chunk = cutter.next_chunk()
        self.assertEqual((chunk.is_first, chunk.is_last, chunk.n_frames, chunk.valid_frames),
                         (True, False, 9, 9))
        self.assertFalse(cutter.ready)
        self.assertIsNone(cutter.next_chunk())
        cutter.finish()
        self.assertTrue(cutter.ready)  # the rest, however short, is the last chunk
        self.assertTrue(cutter.next_chunk().is_last)
        self.assertFalse(cutter.ready)

    def test_segments_hold_the_samples_their_frames_need(self):
        samples = np.arange(1, 8001, dtype=np.float32)  # 0.5 s, every sample distinct
        _, chunks = cut_all(samples, piece=777)
        frames_done = 0
        for chunk in chunks:
            self.assertEqual(len(chunk.samples), G.segment_length(chunk.n_frames))
            start = frames_done * G.hop - G.margin
            expected = np.concatenate([np.zeros(max(0, -start)), samples[max(0, start):]])
            expected = np.concatenate([expected, np.zeros(len(chunk.samples))])
            np.testing.assert_array_equal(chunk.samples, expected[:len(chunk.samples)])
            self.assertEqual(chunk.valid_samples, min(len(chunk.samples), len(samples) - start))
            frames_done += chunk.valid_frames
        self.assertEqual(frames_done, G.frames_for(len(samples)))

    def test_chunk_sequence(self):
        _, chunks = cut_all(np.zeros(16000, np.float32), piece=1000)
        # 100 frames: 9, five times 16, and the last 11.
        self.assertEqual([c.n_frames for c in chunks], [9] + [16] * 6)
        self.assertEqual([c.valid_frames for c in chunks], [9] + [16] * 5 + [11])
        self.assertEqual([c.is_first for c in chunks], [True] + [False] * 6)
        self.assertEqual([c.is_last for c in chunks], [False] * 6 + [True])

    def test_last_chunk_may_be_empty(self):
        # 25 frames, the second chunk cut before the stream ends: the last
        # chunk has no frames of its own but still closes the stream.
        n = G.samples_needed(9)
        self.assertEqual(G.frames_for(n), 25)
        _, chunks = cut_all(np.zeros(n, np.float32))
        self.assertEqual([c.valid_frames for c in chunks], [9, 16, 0])
        self.assertEqual([c.is_last for c in chunks], [False, False, True])

    def test_chunk_holding_the_end_is_last(self):
        # The same 25 frames, ended before the second chunk could be cut.
        _, chunks = cut_all(np.zeros(25 * 160, np.float32))
        self.assertEqual([c.valid_frames for c in chunks], [9, 16])
        self.assertEqual([c.is_last for c in chunks], [False, True])

    def test_short_streams(self):
        for n, frames in [(0, 0), (100, 0), (160, 1), (1500, 9)]:
            _, chunks = cut_all(np.zeros(n, np.float32))
            self.assertEqual(len(chunks), 1, n)
            self.assertEqual((chunks[0].is_first, chunks[0].is_last, chunks[0].valid_frames),
                             (True, True, frames))

    def test_nothing_after_the_last_chunk(self):
        cutter, chunks = cut_all(np.zeros(5000, np.float32))
        self.assertTrue(cutter.done)
        self.assertIsNone(cutter.next_chunk())
        self.assertRaises(ValueError, cutter.push, np.zeros(1, np.float32))

    def test_keyterms_go_with_the_next_chunk(self):
        """A stream's key terms go with its first chunk, and later with the
        first chunk cut after they change (None: unchanged)."""
        cutter = ChunkCutter(1, G)
        cutter.push(np.zeros(16000, np.float32))
        self.assertEqual(cutter.next_chunk().keyterms, ())
        self.assertIsNone(cutter.next_chunk().keyterms)
        cutter.keyterms = ["zurich"]
        self.assertEqual(cutter.next_chunk().keyterms, ("zurich",))
        self.assertIsNone(cutter.next_chunk().keyterms)

    def test_buffer_stays_bounded(self):
        cutter = ChunkCutter(1, G)
        for _ in range(200):
            cutter.push(np.zeros(2560, np.float32))
            while cutter.next_chunk() is not None:
                pass
        self.assertLess(cutter.buffered_samples, 2 * 2560)
        self.assertLess(len(cutter._buf), 3 * 2560 + G.margin)

    def test_audio_each_chunk_covers(self):
        # A chunk covers the audio that had to arrive before it could be cut;
        # the last covers everything.
        cutter, chunks = cut_all(np.zeros(8000, np.float32), piece=500)
        frames_done = 0
        for chunk in chunks[:-1]:
            self.assertEqual(chunk.audio_samples, G.samples_needed(frames_done))
            frames_done += chunk.n_frames
        self.assertEqual(chunks[-1].audio_samples, 8000)
        covered = [c.audio_samples for c in chunks]
        self.assertEqual(covered, sorted(covered))
        # A chunk cut before the end is known covers only what it needed.
        cutter = ChunkCutter(1, G)
        cutter.push(np.zeros(5000, np.float32))
        self.assertEqual(cutter.next_chunk().audio_samples, G.samples_needed(0))

    def test_pad_to_chunk(self):
        cutter = ChunkCutter(1, G)
        self.assertEqual(cutter.pad_to_chunk(), 0)  # nothing to decode
        self.assertEqual(cutter.received, 0)
        audio = np.arange(1, 1001, dtype=np.float32)
        cutter.push(audio)
        first = G.samples_needed(0)
        self.assertEqual(cutter.pad_to_chunk(), first)
        self.assertEqual(cutter.received, first)
        chunk = cutter.next_chunk()
        self.assertEqual(chunk.audio_samples, first)
        # The audio is unchanged, followed by silence.
        body = chunk.samples[G.margin:]
        np.testing.assert_array_equal(body[:1000], audio)
        self.assertFalse(body[1000:].any())
        # Right after a chunk: nothing more to pad.
        self.assertEqual(cutter.pad_to_chunk(), first)
        self.assertEqual(cutter.received, first)
        # A chunk and most of another: only the chunk being filled is completed.
        cutter.push(np.ones(2 * 16 * G.hop - 10, np.float32))
        second, third = G.samples_needed(9), G.samples_needed(25)
        self.assertEqual(cutter.pad_to_chunk(), third)
        self.assertEqual([c.audio_samples for c in iter(cutter.next_chunk, None)],
                         [second, third])
        cutter.finish()
        self.assertRaises(ValueError, cutter.pad_to_chunk)
