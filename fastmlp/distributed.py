"""Data-parallel training over MPI (mpi4py): what `fit(..., comm=...)` adds.

Every rank holds the same model and draws the same row order each epoch.
A step's global batch of B rows is split into contiguous shards, one per
rank; each rank runs the usual kernels on its shard only (scaled by the
whole batch's total weight, so the shards' gradients sum to the batch
gradient), then one `Allreduce` sums the flat gradient buffer, and every
rank applies the same update to the same parameters. The result is
single-process training with batch size B, up to the order of the gradient
sums. The step loop is the single process's own (`step.train_steps`), in
compiled code: it calls MPI_Allreduce through the library's function
pointer (collective.py).

The gradient buffer carries TAIL extra values after the P gradients: the
shard's loss sum, its score sum and its rank's Ctrl-C flag, so that the
one Allreduce per step also tells every rank the step's loss (divergence is
judged on the same number everywhere) and whether any rank was interrupted
(all ranks stop after the same step). Nothing in a step is pickled.

The updates run on every rank from the same reduced gradient; they are
bit-identical when the ranks run the same build on the same kind of CPU. fit
checks that at the end of every epoch (a CRC of the parameters on every
rank) and stops with an error rather than go on with ranks that disagree.
"""
import ctypes
import os
import zlib

import numpy as np

from .buffers import Batches
from .cores import cpu_quota
from .step import TAIL, TALLY

MISSING_MPI = ("distributed training needs mpi4py and an MPI library: pip install "
               "'fastmlp[mpi]' (plus 'mpich' where the machine has no MPI of its own), "
               "then start it with mpiexec -n N")


def world():
    """MPI.COMM_WORLD, or an ImportError that says what to install."""
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise ImportError(f"{MISSING_MPI} ({exc})") from None
    return MPI.COMM_WORLD


def rank_threads(comm):
    """Threads for this rank: the cores it may run on (no more than its
    cgroup's CPU quota: cores.cpu_quota), shared with the other ranks of its
    machine whose cores overlap its own. Unbound ranks on a 2-core machine
    get 1 thread each; ranks bound to 4 cores each get 4."""
    from mpi4py import MPI
    mine = os.sched_getaffinity(0)
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        sets = local.allgather(sorted(mine))
    finally:
        local.Free()
    sharers = sum(1 for cores in sets if mine.intersection(cores))
    return max(1, min(len(mine), cpu_quota() or len(mine)) // sharers)


def data_digest(array):
    """A CRC of an array's values, to check that ranks hold the same labels."""
    return zlib.crc32(np.ascontiguousarray(array).view(np.uint8).ravel())


def check_same_job(comm, settings):
    """Raises the same ValueError on every rank unless all ranks passed equal
    settings (a dict): a rank with other data or flags would otherwise make
    the others wait forever or train on a mix."""
    every = comm.allgather(settings)
    for rank, theirs in enumerate(every):
        for key, value in every[0].items():
            if theirs.get(key) != value:
                raise ValueError(f"MPI ranks disagree on {key}: rank 0 has {value!r}, rank "
                                 f"{rank} has {theirs.get(key)!r}; every rank must call fit "
                                 f"with the same data and settings")


def broadcast_state(comm, model):
    """Gives every rank rank 0's parameters, optimizer state and training
    state (updates, epoch, step and shuffling generator): at the start of
    fit, so that a resumed or differently seeded rank follows rank 0."""
    state, progress = model.optimizer_state, model.training_state
    meta = comm.bcast((state.updates, progress.epoch, progress.step, progress.rng_state), root=0)
    state.updates, progress.epoch, progress.step, progress.rng_state = meta
    for array in (model.params, state.state1, state.state2):
        comm.Bcast(array, root=0)


def check_params_agree(comm, params, epoch):
    digests = comm.allgather(data_digest(params))
    if len(set(digests)) > 1:
        raise RuntimeError(
            f"MPI ranks hold different parameters after epoch {epoch + 1} (CRCs {digests}): "
            f"every rank must run the same fastmlp, Numba and CPU type")


def mpi_batches(comm, batch_size, dtype, n_params):
    """The step.train_steps Batches of a rank of comm: the addresses of the
    MPI library's MPI_Allreduce and MPI_Wtime (from the module mpi4py calls
    them through), and the handles of comm, of dtype and of MPI.SUM, each as
    wide as the library's handles."""
    from mpi4py import MPI
    library = ctypes.CDLL(MPI.__file__)
    address = [ctypes.cast(getattr(library, name), ctypes.c_void_p).value
               for name in ("MPI_Allreduce", "MPI_Wtime")]
    datatype = MPI.FLOAT if np.dtype(dtype) == np.float32 else MPI.DOUBLE
    handles = [HANDLE_TYPES[MPI._sizeof(kind)](MPI._handleof(handle))
               for kind, handle in ((MPI.Datatype, datatype), (MPI.Op, MPI.SUM),
                                    (MPI.Comm, comm))]
    return Batches(batch_size, comm.rank, comm.size, *address, *handles,
                   np.empty(n_params + TAIL, dtype), np.zeros(TALLY))


def local_batches(batch_size, dtype):
    """The Batches of a single process: one shard, no MPI."""
    none = np.uint32(0)
    return Batches(batch_size, 0, 1, 0, 0, none, none, none, np.empty(0, dtype),
                   np.zeros(TALLY))


# MPI handles by their size in bytes: MPICH's are ints, Open MPI's pointers
HANDLE_TYPES = {4: np.uint32, 8: np.uint64}
