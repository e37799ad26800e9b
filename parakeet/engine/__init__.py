"""
The model side: one batched decoding step over many streams, run on the
model thread, built on nemo_toolkit's cache-aware serving pipeline
(adapted in :mod:`parakeet.engine.nemo`).  Nothing here imports the
reactor side.
"""
