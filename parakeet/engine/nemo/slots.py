"""
The encoder's per-stream cache slots, with fewer copies than NeMo's.

NeMo's ``CacheAwareContextManager`` holds every stream's encoder caches in
slots along dimension 1 of three tensors.  Each step it gathers the batch's
slots with advanced indexing, and afterwards copies the step's new caches
back in two passes: an ``index_select`` by a mapping that is always the
identity (the new caches come out in batch order), then an ``index_copy_``.
With the accelerated encoder's key/value cache (``[L, B, C, 2 D]``, 4.9 MB
per stream of the small model in float32) those copies were a third of a
step at eight streams.

:class:`SlotCaches` keeps NeMo's interface and layout and changes three
things:

* Free slots are handed out lowest first, so the slots of N open streams
  are ``0 .. N-1`` whatever order streams came and went in.
* A batch whose slots are consecutive (the pipeline orders each batch by
  slot, :meth:`order`) reads its caches as views, which the accelerated
  encoder updates in place, so nothing is copied back.  On the CPU any other
  batch is gathered into a buffer kept from step to step, one slice copy
  per run of consecutive slots, and written back the same way:
  ``index_select`` and ``index_copy_`` across the slot dimension took 24 and
  8 ms for 20 streams of the small model in bfloat16, slice copies of the
  same caches 2 ms each way, and a fresh buffer faulted its pages in every
  step.  Elsewhere (CUDA) they stay one ``index_select`` and one
  ``index_copy_``.
* The identity ``index_select`` is not done.
"""

import heapq

import torch
from nemo.collections.asr.inference.utils.context_manager import (
    CacheAwareContext, CacheAwareContextManager)


class LowestFirst:
    """Free slot numbers, the lowest out first (the part of ``queue.Queue``
    that NeMo's context manager uses)."""

    def __init__(self, numbers=()):
        self._heap = list(numbers)
        heapq.heapify(self._heap)

    def put(self, number):
        heapq.heappush(self._heap, number)

    def get(self):
        return heapq.heappop(self._heap)

    def empty(self):
        return not self._heap

    def qsize(self):
        return len(self._heap)


def _consecutive(slot_ids):
    """slice(first, last + 1) if slot_ids count up by one, else None."""
    first = slot_ids[0]
    if all(slot == first + i for i, slot in enumerate(slot_ids)):
        return slice(first, first + len(slot_ids))
    return None


def _runs(slot_ids):
    """(position in the batch, first slot, count) of each run of consecutive
    slots in slot_ids."""
    runs = []
    for position, slot in enumerate(slot_ids):
        if runs and slot == runs[-1][1] + runs[-1][2]:
            runs[-1][2] += 1
        else:
            runs.append([position, slot, 1])
    return runs


class SlotCaches(CacheAwareContextManager):

    _gathered = None

    def reset(self):
        super().reset()
        if not self.cache_disabled:
            self.free_slots = LowestFirst(range(self.num_slots))
        self._gathered = None

    def _assign(self, stream_ids):
        for stream_id in stream_ids:
            if stream_id not in self.streamidx2slotidx:
                if self.free_slots.empty():
                    raise RuntimeError("No free slots available")
                slot = self.free_slots.get()
                self.streamidx2slotidx[stream_id] = slot
                self.slotidx2streamidx[slot] = stream_id

    def order(self, stream_ids):
        """Positions of stream_ids in the order of their slots (assigning
        slots to new streams), so that a batch taken in that order reads and
        writes its caches as views where it can."""
        if self.cache_disabled:
            return list(range(len(stream_ids)))
        self._assign(stream_ids)
        slots = self.streamidx2slotidx
        return sorted(range(len(stream_ids)), key=lambda i: slots[stream_ids[i]])

    def _where(self, stream_ids):
        slot_ids = [self.streamidx2slotidx[sid] for sid in stream_ids]
        return slot_ids, _consecutive(slot_ids)

    def get_context(self, stream_ids):
        if len(stream_ids) == 0 or self.cache_disabled:
            return CacheAwareContext(), {}
        self._assign(stream_ids)
        slot_ids, run = self._where(stream_ids)
        stores = self._stores()
        if run is not None:
            caches = [store.narrow(dim, run.start, run.stop - run.start) for store, dim in stores]
        elif self._by_runs:
            caches = self._gather(slot_ids, stores)
        else:
            index = torch.tensor(slot_ids, device=self.device, dtype=torch.long)
            caches = [store.index_select(dim, index) for store, dim in stores]
        return CacheAwareContext(*caches), dict(zip(slot_ids, range(len(slot_ids))))

    @property
    def _by_runs(self):
        """Whether scattered slots are copied run by run (on the CPU)."""
        return self.cache_last_channel.device.type == "cpu"

    def _stores(self):
        """(slot table, its slot dimension) of each cache."""
        return ((self.cache_last_channel, 1), (self.cache_last_time, 1),
                (self.cache_last_channel_len, 0))

    def _gather(self, slot_ids, stores):
        """The caches of slot_ids, copied run by run into the gather buffer,
        which grows to the largest batch gathered."""
        n = len(slot_ids)
        if self._gathered is None or self._gathered[0].size(1) < n:
            self._gathered = [store.new_empty(store.shape[:dim] + (n,) + store.shape[dim + 1:])
                              for store, dim in stores]
        out = [buffer.narrow(dim, 0, n) for buffer, (_, dim) in zip(self._gathered, stores)]
        for position, slot, count in _runs(slot_ids):
            for buffer, (store, dim) in zip(out, stores):
                buffer.narrow(dim, position, count).copy_(store.narrow(dim, slot, count))
        return out

    def update_cache(self, stream_ids, new_context, mapping):
        if self.cache_disabled:
            return
        slot_ids, run = self._where(stream_ids)
        # new_context holds the batch in stream_ids' order: the mapping
        # get_context returned is the identity.
        if [mapping[slot] for slot in slot_ids] != list(range(len(slot_ids))):
            raise ValueError("new caches are not in the batch's order")
        news = (new_context.cache_last_channel, new_context.cache_last_time,
                new_context.cache_last_channel_len)
        runs = _runs(slot_ids) if run is None and self._by_runs else None
        index = None
        for (store, dim), new in zip(self._stores(), news):
            if run is not None and new.data_ptr() == store.narrow(dim, run.start, 1).data_ptr():
                continue  # written in place
            if new.untyped_storage().data_ptr() == store.untyped_storage().data_ptr():
                # A step that returned (part of) its input caches would
                # overlap the slots it is copied into.
                new = new.clone()
            if run is not None:
                store.narrow(dim, run.start, run.stop - run.start).copy_(new)
            elif runs is not None:
                for position, slot, count in runs:
                    store.narrow(dim, slot, count).copy_(new.narrow(dim, position, count))
            else:
                if index is None:
                    index = torch.tensor(slot_ids, device=self.device, dtype=torch.long)
                store.index_copy_(dim, index, new)
