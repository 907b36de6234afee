"""Grain assembly: random-access examples to per-process batches, in an order fixed by the seed.

Train: one global stream `shuffle(seed) -> repeat forever -> augment`, in which epoch e is a
fresh permutation (grain folds e into the shuffle seed) and the augmentation of position i is
seeded by (seed, i). Global batch k is positions kB .. kB+B-1; process p of P reads only its
block of b = B/P of them, kB+pb .. kB+pb+b-1. `xfer.training.mesh.global_batch` puts the blocks in
process order, so the global batch holds exactly what a single process's batch holds, row for
row, and a run computes the same whatever its process count (dropout masks and BatchNorm
groups follow the rows). Everything is indexed by position, so the iterator's state is one
integer (`{"next_index": k}`, global batches read): the same on every process and for every
process count, so a checkpoint written by P processes resumes on any other number.

Batches are formed before the iterator (on the MapDataset), which makes each batch a single
element to grain: threads and worker processes fetch whole batches, and the batches are the same
whatever `num_threads` / `num_workers` are.

Eval: the split in its stored order, padded with masked blank examples to a whole number of global
batches, so every process yields the same number of batches (as collectives require) and every
example counts once; processes read blocks of each global batch as in training.
"""

from __future__ import annotations

from typing import Any, Sequence

import grain
import numpy as np

from xfer.data.transforms import CropFlip, Normalise, Prepare


def train_batches(records: Sequence[dict[str, Any]], augment: CropFlip | Prepare,
                  normalise: Normalise, *, batch_size: int, seed: int, process_index: int,
                  process_count: int, num_threads: int, num_workers: int) -> grain.DatasetIterator:
    """An endless iterator of this process's `batch_size` batches; `get_state()` / `set_state()`."""
    stream = grain.MapDataset.source(records).seed(seed).shuffle().repeat()
    if isinstance(augment, grain.transforms.RandomMap):
        stream = stream.random_map(augment)
    else:
        stream = stream.map(augment)
    batches = stream.batch(batch_size, drop_remainder=True)[process_index::process_count].map(normalise)
    return iter(_prefetched(batches, num_threads, num_workers))


def eval_batches(records: Sequence[dict[str, Any]], prepare: grain.transforms.Map, normalise: grain.transforms.Map,
                 *, batch_size: int, process_index: int, process_count: int, num_threads: int,
                 num_workers: int) -> grain.IterDataset:
    """One pass over `records` in this process's batches, each with a float32 "mask" (0 = padding)
    and the int32 "index" of every example in `records` (padding repeats index 0)."""
    global_batch = batch_size * process_count
    padded_length = -(-len(records) // global_batch) * global_batch
    examples = grain.MapDataset.range(padded_length).map(_PaddedLookup(records, prepare))
    blocks = examples.batch(batch_size)[process_index::process_count]  # lazy: only this process's are read
    return _prefetched(blocks.map(normalise), num_threads, num_workers)


class _PaddedLookup(grain.transforms.Map):
    """Global position -> the prepared example with mask 1, or past the end example 0 with mask 0."""

    def __init__(self, records: Sequence[dict[str, Any]], prepare: grain.transforms.Map):
        self.records = records
        self.prepare = prepare

    def map(self, position: int) -> dict[str, Any]:
        real = position < len(self.records)
        index = position if real else 0
        return {**self.prepare.map(self.records[index]), "mask": np.float32(real), "index": np.int32(index)}


def _prefetched(batches: grain.MapDataset, num_threads: int, num_workers: int) -> grain.IterDataset:
    # The prefetch buffer counts batches: one per thread keeps every thread busy.
    loader = batches.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                                       prefetch_buffer_size=num_threads))
    if num_workers:
        loader = loader.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return loader
