"""
Encoder cache slots (:mod:`parakeet.engine.nemo.slots`) against NeMo's own context
manager: the same caches read and stored for any sequence of batches, with
fewer copies.
"""

import random

import torch
from nemo.collections.asr.inference.utils.context_manager import (
    CacheAwareContext, CacheAwareContextManager)
from twisted.trial import unittest

from parakeet.engine.nemo.slots import LowestFirst, SlotCaches


class CacheModel:
    """The one method the managers call: caches in NeMo's layout."""

    def get_initial_cache_state(self, batch_size):
        return (torch.zeros(3, batch_size, 5, 4), torch.zeros(3, batch_size, 4, 2),
                torch.zeros(batch_size, dtype=torch.long))


def stepped(context, generator):
    """What an encoder step returns: new caches in the batch's order."""
    return CacheAwareContext(
        context.cache_last_channel * 0.5 + torch.rand(context.cache_last_channel.shape,
                                                      generator=generator),
        context.cache_last_time + 1,
        context.cache_last_channel_len + 2)


def caches_of(manager, stream_ids):
    slots = [manager.streamidx2slotidx[s] for s in stream_ids]
    return (manager.cache_last_channel[:, slots], manager.cache_last_time[:, slots],
            manager.cache_last_channel_len[slots])


class LowestFirstTests(unittest.TestCase):

    def test_lowest_first(self):
        free = LowestFirst(range(4))
        self.assertEqual([free.get(), free.get()], [0, 1])
        free.put(0)
        self.assertEqual(free.qsize(), 3)
        self.assertEqual([free.get(), free.get(), free.get()], [0, 2, 3])
        self.assertTrue(free.empty())


class SlotCachesTests(unittest.TestCase):

    def setUp(self):
        self.ours = SlotCaches(CacheModel(), num_slots=6)
        self.nemo = CacheAwareContextManager(CacheModel(), num_slots=6)

    def step_both(self, stream_ids, ending=(), seed=0):
        """One step of stream_ids in both managers (each in its own order of
        slots, as the pipeline runs them); the contexts each gave."""
        contexts = []
        for manager in (self.ours, self.nemo):
            ids = list(stream_ids)
            if manager is self.ours:
                ids = [ids[i] for i in manager.order(ids)]
            context, mapping = manager.get_context(ids)
            contexts.append(dict(zip(ids, zip(context.cache_last_channel.unbind(1),
                                              context.cache_last_time.unbind(1),
                                              context.cache_last_channel_len.unbind(0)))))
            # Clone before the step: a view's values change when it is written back.
            contexts[-1] = {k: tuple(t.clone() for t in v) for k, v in contexts[-1].items()}
            new = self.new_caches(context, ids, seed)
            manager.update_cache(ids, new, mapping)
            manager.reset_slots(ids, [s in ending for s in ids])
        return contexts

    def new_caches(self, context, ids, seed):
        # The same new values per stream whatever the batch's order.
        rows = []
        for i, stream_id in enumerate(ids):
            generator = torch.Generator().manual_seed(seed * 1000 + stream_id)
            rows.append(stepped(CacheAwareContext(context.cache_last_channel[:, i:i + 1],
                                                  context.cache_last_time[:, i:i + 1],
                                                  context.cache_last_channel_len[i:i + 1]),
                                generator))
        return CacheAwareContext(torch.cat([r.cache_last_channel for r in rows], 1),
                                 torch.cat([r.cache_last_time for r in rows], 1),
                                 torch.cat([r.cache_last_channel_len for r in rows], 0))

    def assertSameContexts(self, ours, nemo):
        self.assertEqual(set(ours), set(nemo))
        for stream_id in ours:
            for a, b in zip(ours[stream_id], nemo[stream_id]):
                self.assertTrue(torch.equal(a, b), stream_id)

    def test_same_caches_as_nemo(self):
        rng = random.Random(3)
        open_streams, next_id = [], 1
        for step in range(60):
            while len(open_streams) < 6 and rng.random() < 0.5:
                open_streams.append(next_id)
                next_id += 1
            if not open_streams:
                continue
            batch = rng.sample(open_streams, rng.randint(1, len(open_streams)))
            ending = {s for s in batch if rng.random() < 0.15}
            ours, nemo = self.step_both(batch, ending, seed=step)
            self.assertSameContexts(ours, nemo)
            open_streams = [s for s in open_streams if s not in ending]
        self.assertGreater(next_id, 12)
        for stream_id in open_streams:
            for a, b in zip(caches_of(self.ours, [stream_id]), caches_of(self.nemo, [stream_id])):
                self.assertTrue(torch.equal(a, b))

    def test_same_caches_as_nemo_with_indexed_copies(self):
        # As on CUDA: scattered slots gathered and written back by index.
        self.patch(SlotCaches, "_by_runs", False)
        self.test_same_caches_as_nemo()

    def test_consecutive_slots_are_read_as_views(self):
        ids = [7, 8, 9]
        self.assertEqual(self.ours.order(ids), [0, 1, 2])
        context, _ = self.ours.get_context(ids)
        store = self.ours.cache_last_channel
        self.assertEqual(context.cache_last_channel.data_ptr(), store.data_ptr())
        # Slots 0 and 2 are not consecutive: a copy.
        context, _ = self.ours.get_context([7, 9])
        self.assertNotEqual(context.cache_last_channel.untyped_storage().data_ptr(),
                            store.untyped_storage().data_ptr())

    def test_gathered_into_one_buffer(self):
        self.ours.order([1, 2, 3, 4])
        first, mapping = self.ours.get_context([1, 3])
        self.ours.update_cache([1, 3], first, mapping)
        second, _ = self.ours.get_context([2, 4])
        self.assertEqual(first.cache_last_channel.data_ptr(),
                         second.cache_last_channel.data_ptr())
        # A larger batch than any before: a larger buffer.
        third, _ = self.ours.get_context([1, 2, 4])
        self.assertEqual(third.cache_last_channel.size(1), 3)
        self.assertTrue(torch.equal(third.cache_last_channel,
                                    caches_of(self.ours, [1, 2, 4])[0]))

    def test_batch_ordered_by_slot(self):
        self.ours.order([5, 6, 7])
        self.ours.reset_slots([5], [True])
        # Stream 8 takes the lowest free slot, 0.
        self.assertEqual(self.ours.order([7, 8, 6]), [1, 2, 0])
        self.assertEqual(self.ours.streamidx2slotidx, {8: 0, 6: 1, 7: 2})

    def test_a_step_returning_its_input_caches(self):
        ids = [1, 2]
        context, mapping = self.ours.get_context(ids)
        before = context.cache_last_channel.clone()
        self.ours.update_cache(ids, context, mapping)
        self.assertTrue(torch.equal(caches_of(self.ours, ids)[0], before))
        shifted = CacheAwareContext(self.ours.cache_last_channel[:, 1:3],
                                    self.ours.cache_last_time[:, 1:3],
                                    self.ours.cache_last_channel_len[1:3])
        self.ours.cache_last_channel[:, 2] = 5.0
        self.ours.update_cache(ids, shifted, mapping)
        self.assertTrue(torch.equal(self.ours.cache_last_channel[:, 0:2],
                                    torch.cat([before[:, 1:2], torch.full_like(before[:, :1], 5.0)],
                                              1)))

    def test_new_caches_out_of_order_are_refused(self):
        context, mapping = self.ours.get_context([1, 2])
        with self.assertRaises(ValueError):
            self.ours.update_cache([1, 2], context, {0: 1, 1: 0})

    def test_full(self):
        self.ours.order(list(range(6)))
        with self.assertRaises(RuntimeError):
            self.ours.get_context([99])
