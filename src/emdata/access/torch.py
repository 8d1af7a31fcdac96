"""PyTorch datasets over grids and samplers: picklable, reopened per worker, split exactly among workers and ranks.

Importing this module imports torch (``emdata.access`` itself never does). The datasets hold only what
reopens their arrays (``EmArray`` pickles as an ``open_array`` recipe) and reopen them lazily in each
DataLoader worker, so they work with any ``num_workers`` and start method. ``data_loader`` builds a
``torchdata`` ``StatefulDataLoader`` (checkpointable data position, also with workers) with a start method
that is safe next to tensorstore; see DATA_ACCESS_DESIGN.md, "DataLoader workers, DDP and fork".
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, default_collate, get_worker_info

from emdata.access.grid import Block, BlockGrid, prefetched
from emdata.access.sampling import RandomBlockSampler
from emdata.errors import InvalidParameterError

# torch has no uint16/uint32/uint64 tensors in older releases: widen to a signed type that holds them (uint64
# values must be below 2^63, e.g. label IDs; larger ones are refused, not wrapped to negative numbers).
_TORCH_SAFE = {np.dtype(np.uint16): np.int32, np.dtype(np.uint32): np.int64, np.dtype(np.uint64): np.int64}


_INT_FIELDS = ("read_start", "block_start", "core_start", "core_stop")


def _placement(blocks: Sequence[Block]) -> tuple[np.ndarray, Any]:
    """Every block's placement as one row of an int64 array (read, block, core start; core stop; index) and one
    row of floats (voxel size, read origin): numpy if torch's default float dtype has one, else a tensor."""
    ints = np.array([(*b.read_box.start, *b.block_box.start, *b.core_box.start, *b.core_box.stop, *b.index)
                     for b in blocks], np.int64)
    floats = [(*b.voxel_size_nm, *b.read_origin_nm) for b in blocks]
    float_dtype = _NUMPY_FLOAT.get(torch.get_default_dtype())
    return ints, np.array(floats, float_dtype) if float_dtype is not None else torch.tensor(floats)


def _torch_dtype(dtype: np.dtype) -> np.dtype:
    return np.dtype(_TORCH_SAFE.get(dtype, dtype))


def _check_fits(block: Block, data: np.ndarray) -> None:
    """uint64 data becomes int64: values of 2^63 and more would come out negative, so they are refused."""
    if data.dtype == np.uint64 and data.size and int(data.max()) >= 2**63:
        raise InvalidParameterError(
            f"block at {block.read_box} holds uint64 value {int(data.max())} >= 2^63, which torch's int64 cannot "
            f"hold; read this array without the torch adapter")


def block_to_item(block: Block) -> dict[str, Any]:
    """A block as a dict of a (1, z, y, x) tensor and its placement (plain tensors, collate-friendly)."""
    data = block.data
    assert data is not None
    _check_fits(block, data)
    data = data.astype(_torch_dtype(data.dtype), copy=False)
    # One int64 and one float array, cut into views: the same values and dtypes as torch.tensor of each tuple
    # (int64; torch's default float dtype), a fraction of the per-item cost.
    ints, floats = _placement((block,))
    item = {"data": torch.from_numpy(np.ascontiguousarray(data))[None]}
    item.update((name, torch.from_numpy(ints[0, 3 * i:3 * i + 3])) for i, name in enumerate(_INT_FIELDS))
    item["index"] = torch.from_numpy(ints[0, 12:])
    both = torch.as_tensor(floats[0])
    item["voxel_size_nm"], item["read_origin_nm"] = both[:3], both[3:]
    return item


def blocks_to_batch(blocks: Sequence[Block], data: np.ndarray | None = None) -> dict[str, Any]:
    """``collate([block_to_item(b) for b in blocks])`` (the same keys, values, dtypes and shapes), built at once:
    the blocks' data go straight into the batch tensor and each placement field is one array.

    ``data``: the batch's data array, ``(len(blocks), 1, *shape)``; blocks whose data already is its row
    (read into it) are not copied.
    """
    first = blocks[0].data
    assert first is not None
    if any(b.data is None or b.data.shape != first.shape or b.data.dtype != first.dtype for b in blocks):
        return collate([block_to_item(b) for b in blocks])  # default_collate's error for unequal shapes
    if data is None:
        data = np.empty((len(blocks), 1, *first.shape), _torch_dtype(first.dtype))
    if data.shape != (len(blocks), 1, *first.shape) or data.dtype != _torch_dtype(first.dtype):
        raise InvalidParameterError(f"data is {data.shape} {data.dtype}; {len(blocks)} blocks of {first.shape} "
                                    f"{first.dtype} need {(len(blocks), 1, *first.shape)} {_torch_dtype(first.dtype)}")
    for i, b in enumerate(blocks):
        row, src = data[i, 0], b.data
        assert src is not None
        _check_fits(b, src)
        if not (src.base is data.base and src.__array_interface__ == row.__array_interface__):
            row[...] = src
    ints, floats = _placement(blocks)
    batch = {"data": torch.from_numpy(data)}
    batch.update((name, torch.from_numpy(np.ascontiguousarray(ints[:, 3 * i:3 * i + 3])))
                 for i, name in enumerate(_INT_FIELDS))
    batch["index"] = torch.from_numpy(np.ascontiguousarray(ints[:, 12:]))
    for name, part in (("voxel_size_nm", floats[:, :3]), ("read_origin_nm", floats[:, 3:])):
        batch[name] = (torch.from_numpy(np.ascontiguousarray(part)) if isinstance(part, np.ndarray)
                       else part.contiguous())
    return batch


def _int_scalar(value: int) -> torch.Tensor:
    """``torch.tensor(value)`` (a 0-d int64 tensor) through numpy: torch.tensor waits for the GIL again."""
    return torch.from_numpy(np.array(value, np.int64))


# torch.stack copies large tensors on torch's intra-op threads, which wait for a core while our reading
# threads hold them (measured 6 ms per 2 MB batch), and even small ones cost ~25 us each while reading
# threads run: numpy stacks all of them (tensors of at least this many elements).
_NUMPY_STACK_MIN = 0


def collate(batch: list[Any]) -> Any:
    """``default_collate`` with the same result; in the main process CPU tensors are stacked by numpy.

    In a DataLoader worker it is ``default_collate`` (which stacks into shared memory for the transfer).
    """
    if get_worker_info() is not None:
        return default_collate(batch)
    elem = batch[0]
    if type(elem) is dict and all(type(b) is dict and b.keys() == elem.keys() for b in batch):
        return {key: collate([b[key] for b in batch]) for key in elem}
    if (isinstance(elem, torch.Tensor) and elem.numel() >= _NUMPY_STACK_MIN and elem.device.type == "cpu"
            and not elem.requires_grad and elem.dtype in _NUMPY_DTYPES
            and all(isinstance(b, torch.Tensor) and b.shape == elem.shape and b.dtype == elem.dtype
                    and b.device.type == "cpu" and not b.requires_grad for b in batch)):
        return torch.from_numpy(np.stack([b.numpy() for b in batch]))
    return default_collate(batch)


_NUMPY_FLOAT = {torch.float32: np.float32, torch.float64: np.float64}
_NUMPY_DTYPES = {torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16, torch.float32,
                 torch.float64, torch.bool}


def _rank_world(rank: int | None, world_size: int | None, default: tuple[int, int] = (0, 1)) -> tuple[int, int]:
    """Explicit rank/world_size, else torch.distributed's when initialised, else ``default``."""
    if rank is None and world_size is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return default
    if rank is None or world_size is None:
        raise InvalidParameterError(f"give rank and world_size together, got rank={rank!r}, world_size={world_size!r}")
    if isinstance(world_size, bool) or world_size < 1 or not 0 <= rank < world_size:
        raise InvalidParameterError(f"need 0 <= rank < world_size, got rank={rank!r}, world_size={world_size!r}")
    return int(rank), int(world_size)


class _Reopening:
    """Holds one object whose arrays are reopened (by a pickle round trip) the first time it is used in a
    process other than the one that made it: forked DataLoader workers inherit the parent's tensorstore
    handles, which must not be used there."""

    def __init__(self, obj: Any) -> None:
        self._obj = obj
        self._pid = os.getpid()

    def get(self) -> Any:
        if self._pid != os.getpid():
            self._obj = pickle.loads(pickle.dumps(self._obj))
            self._pid = os.getpid()
        return self._obj

    def __getstate__(self) -> dict[str, Any]:
        return {"_obj": self._obj}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._obj = state["_obj"]  # unpickling reopened the arrays in this process
        self._pid = os.getpid()


class GridDataset(Dataset):  # type: ignore[type-arg]
    """Map-style dataset of this rank's blocks of ``grid`` (round robin over ranks, as ``grid.shard``).

    Item ``i`` is block ``rank + i * world_size``: ranks get disjoint blocks whose union is the grid, each
    exactly once (no padding, unlike ``DistributedSampler``; ranks may differ by one block). DataLoader
    workers get indices from the loader's sampler, so each block is read once whatever ``num_workers``.
    Items: ``block_to_item`` plus ``flat_index`` (the grid's flat index, for ``grid.block_at``).
    """

    def __init__(self, grid: BlockGrid, *, rank: int | None = None, world_size: int | None = None) -> None:
        self.rank, self.world_size = _rank_world(rank, world_size)
        self._grid = _Reopening(grid)
        self.indices = grid.shard(self.rank, self.world_size)

    @property
    def grid(self) -> BlockGrid:
        return self._grid.get()  # type: ignore[no-any-return]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict[str, Any]:
        flat = self.indices[index]
        item = block_to_item(self.grid[flat])
        item["flat_index"] = _int_scalar(flat)
        return item


class SamplerDataset(IterableDataset):  # type: ignore[type-arg]
    """Iterable dataset of random samples; every sample index is drawn exactly once per epoch.

    Rank ``r`` of ``R`` owns per-rank positions ``k = 0, 1, ...`` (``num_samples`` per epoch, or endless),
    i.e. global sample indices ``r + (epoch * num_samples + k) * R``; DataLoader worker ``w`` of ``W`` takes
    the positions ``k = start + w, start + w + W, ...``, so the samples of an epoch are the same whatever
    ``W``. ``set_epoch(e)`` moves to the next ``num_samples`` indices (call it before each epoch, as with
    ``DistributedSampler``; with ``persistent_workers`` it does not reach the workers). ``state_dict`` /
    ``load_state_dict`` hold the position of this process's worker; ``StatefulDataLoader`` collects them
    for every worker, so ``loader.state_dict()`` resumes exactly (with the same ``num_workers``).
    """

    def __init__(self, sampler: RandomBlockSampler, *, rank: int | None = None,
                 world_size: int | None = None) -> None:
        if rank is None and world_size is None and sampler.world_size > 1:
            rank, world_size = sampler.rank, sampler.world_size  # the sampler was given its rank explicitly
        self.rank, self.world_size = _rank_world(rank, world_size)
        self.start = sampler.position
        self.num_samples = sampler.num_samples
        self.prefetch = sampler.prefetch
        self.epoch = 0
        self._sampler = _Reopening(sampler)
        self._next: int | None = None  # the next position this worker yields (None: not started)
        self._resume: dict[str, int] | None = None

    @property
    def sampler(self) -> RandomBlockSampler:
        return self._sampler.get()  # type: ignore[no-any-return]

    def set_epoch(self, epoch: int) -> None:
        if self.num_samples is None and epoch != 0:
            raise InvalidParameterError("set_epoch needs a sampler with num_samples (an endless one has no epochs)")
        self.epoch = int(epoch)

    def global_index(self, position: int) -> int:
        per_epoch = 0 if self.num_samples is None else self.epoch * self.num_samples
        return self.rank + (per_epoch + position) * self.world_size

    def _positions(self, first: int, step: int) -> Iterator[int]:
        k = first
        while self.num_samples is None or k < self.num_samples:
            yield k
            k += step

    def _samples(self, out_for: Callable[[int], dict[str, np.ndarray]] | None = None,
                 ) -> Iterator[tuple[int, dict[str, Block]]]:
        """This worker's (global index, sample) pairs, read ahead; the position is kept for ``state_dict``.

        ``out_for(j)``, called in order on this thread before the ``j``-th sample is read: arrays to read it into.
        """
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        first = self.start + worker
        if self._resume is not None:
            if self._resume.get("num_workers", n_workers) != n_workers:
                raise InvalidParameterError(
                    f"this state was saved with {self._resume['num_workers']} workers; resume with the same "
                    f"num_workers (got {n_workers})")
            self.epoch = self._resume["epoch"]
            first = self._resume["next"]
            self._resume = None
        sampler = self.sampler

        def jobs() -> Iterator[tuple[int, dict[str, np.ndarray] | None]]:
            for j, k in enumerate(self._positions(first, n_workers)):
                yield k, None if out_for is None else out_for(j)

        def draw(job: tuple[int, dict[str, np.ndarray] | None]) -> tuple[int, dict[str, Block]]:
            k, out = job
            return k, sampler.sample(self.global_index(k), out=out)

        for k, sample in prefetched(jobs(), draw, self.prefetch):
            # Counted before handing out: a state saved while holding this sample resumes after it.
            self._next = k + n_workers
            yield self.global_index(k), sample

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for index, sample in self._samples():
            item: dict[str, Any] = {key: block_to_item(block) for key, block in sample.items()}
            item["sample_index"] = _int_scalar(index)
            yield item

    def batches(self, batch_size: int, drop_last: bool = False) -> Iterator[dict[str, Any]]:
        """This worker's samples in batches of ``batch_size``: what a DataLoader with that ``batch_size`` and
        ``collate`` makes of ``iter(self)`` (also the last, shorter batch, unless ``drop_last``), built without
        per-item tensors in the main process (``blocks_to_batch``); in a DataLoader worker, ``default_collate``
        of the items (it stacks into shared memory for the transfer)."""
        _check_batch_size(batch_size)
        if get_worker_info() is not None:
            yield from _batched(self.__iter__(), batch_size, drop_last, default_collate)
            return
        # Each batch's samples are read straight into one array per key (dtypes torch has), then only the
        # placement is built here. A batch's arrays are made when its first sample is handed to the readers, and
        # batches are built in that order, so the oldest arrays are always the next batch's.
        layout = {key: (shape, dtype) for key, (shape, dtype) in self.sampler.read_shapes().items()
                  if _torch_dtype(dtype) == dtype}
        buffers: deque[dict[str, np.ndarray]] = deque()

        def out_for(j: int) -> dict[str, np.ndarray]:
            if j % batch_size == 0:
                buffers.append({key: np.empty((batch_size, 1, *shape), dtype) for key, (shape, dtype) in layout.items()})
            return {key: buf[j % batch_size, 0] for key, buf in buffers[-1].items()}

        def batch(samples: list[tuple[int, dict[str, Block]]]) -> dict[str, Any]:
            data = buffers.popleft()
            out: dict[str, Any] = {key: blocks_to_batch([sample[key] for _, sample in samples],
                                                        data[key][:len(samples)] if key in data else None)
                                   for key in samples[0][1]}
            out["sample_index"] = torch.from_numpy(np.array([index for index, _ in samples], np.int64))
            return out

        yield from _batched(self._samples(out_for), batch_size, drop_last, batch)

    def state_dict(self) -> dict[str, int]:
        # Also asked before this worker's iterator has started (StatefulDataLoader's first snapshot).
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        nxt = self.start + worker if self._next is None else self._next
        return {"epoch": self.epoch, "next": nxt, "num_workers": n_workers, "rank": self.rank,
                "world_size": self.world_size}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        if (state.get("rank", self.rank), state.get("world_size", self.world_size)) != (self.rank, self.world_size):
            raise InvalidParameterError(
                f"this state belongs to rank {state.get('rank')} of {state.get('world_size')}, this dataset is "
                f"rank {self.rank} of {self.world_size}")
        self._resume = {k: int(v) for k, v in state.items()}


def _check_batch_size(batch_size: Any) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidParameterError(f"batch_size must be a positive int, got {batch_size!r}")


def _batched(items: Iterator[Any], batch_size: int, drop_last: bool, collate_fn: Callable[[list[Any]], Any],
             ) -> Iterator[Any]:
    """``collate_fn`` of each ``batch_size`` items in turn (and of the last, shorter batch unless ``drop_last``)."""
    pending: list[Any] = []
    for item in items:
        pending.append(item)
        if len(pending) == batch_size:
            yield collate_fn(pending)
            pending = []
    if pending and not drop_last:
        yield collate_fn(pending)


class _Batches(IterableDataset):  # type: ignore[type-arg]
    """A ``SamplerDataset`` batched in the dataset (``SamplerDataset.batches``): ``data_loader`` runs the loader
    on it with ``batch_size=None``. Epoch and checkpoint calls go to the wrapped dataset."""

    def __init__(self, dataset: SamplerDataset, batch_size: int, drop_last: bool) -> None:
        _check_batch_size(batch_size)
        self.dataset, self.batch_size, self.drop_last = dataset, batch_size, drop_last

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self.dataset.batches(self.batch_size, self.drop_last)

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def state_dict(self) -> dict[str, int]:
        return self.dataset.state_dict()

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.dataset.load_state_dict(state)


def _as_is(batch: Any) -> Any:
    return batch


def grid_dataset(grid: BlockGrid, *, rank: int | None = None, world_size: int | None = None) -> GridDataset:
    """A map-style dataset over ``grid``'s blocks for inference (pair it with ``BlockWriter`` or ``emdata.access.dask``).

    Under DDP each rank gets its own blocks (``rank``/``world_size``, default torch.distributed's), each
    block exactly once over all ranks and workers. Wrap it with ``data_loader`` for workers.
    """
    return GridDataset(grid, rank=rank, world_size=world_size)


def sampler_dataset(sampler: RandomBlockSampler, *, rank: int | None = None,
                    world_size: int | None = None) -> SamplerDataset:
    """An iterable dataset of training samples; workers and DDP ranks draw disjoint indices, each once per epoch.

    ``rank``/``world_size`` default to the sampler's, or torch.distributed's when the sampler has none. Set
    ``prefetch=0`` on the sampler when DataLoader workers already read ahead.
    """
    return SamplerDataset(sampler, rank=rank, world_size=world_size)


def safe_start_method() -> str:
    """``forkserver`` where the platform has it, else ``spawn``: worker processes that start clean.

    ``fork`` copies a process whose tensorstore (and torch, OpenMP) threads are running; tensorstore then
    aborts in the child. Our datasets survive it by reading through zarr-python in such a child, but a
    clean start keeps the fast tensorstore path in every worker.
    """
    methods = multiprocessing.get_all_start_methods()
    return "forkserver" if "forkserver" in methods else "spawn"


def data_loader(dataset: Dataset[Any], *, batch_size: int | None = 1, num_workers: int = 0,
                multiprocessing_context: str | Any | None = None, **kwargs: Any) -> Any:
    """A ``torchdata.stateful_dataloader.StatefulDataLoader`` whose workers start with ``safe_start_method()``.

    ``loader.state_dict()`` / ``load_state_dict()`` checkpoint the data position, also with workers (resume
    with the same ``num_workers``). An explicit ``multiprocessing_context`` (even ``"fork"``) is honoured.
    Batches are collated by ``collate`` (``default_collate``'s result, stacked by numpy in the main process)
    unless ``collate_fn`` is given. A ``SamplerDataset`` without ``collate_fn`` is batched in the dataset
    (``SamplerDataset.batches``: the same batches, at a fraction of the per-item cost); the loader then runs
    with ``batch_size=None`` and takes ``set_epoch`` and checkpoints through to your dataset as before.
    Other keyword arguments go to the loader unchanged.
    """
    from torchdata.stateful_dataloader import StatefulDataLoader

    if num_workers > 0 and multiprocessing_context is None:
        multiprocessing_context = safe_start_method()
    if kwargs.get("collate_fn") is None and batch_size is not None:
        if isinstance(dataset, SamplerDataset):
            # Batched in the dataset: the same batches, without per-item tensors and stacking on this thread.
            dataset = _Batches(dataset, batch_size, bool(kwargs.pop("drop_last", False)))
            batch_size, kwargs["collate_fn"] = None, _as_is
        else:
            kwargs["collate_fn"] = collate
    with warnings.catch_warnings():
        # torchdata 0.11 calls torch.set_vital, which torch 2.13 deprecates; nothing for the user to act on.
        warnings.filterwarnings("ignore", message="'set_vital' is deprecated", category=UserWarning)
        return StatefulDataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                                  multiprocessing_context=multiprocessing_context if num_workers > 0 else None,
                                  **kwargs)
