"""Past one device: data parallelism and ZeRO over MPI (NumPy, CPU ranks) and NCCL (CuPy, GPUs).

world          rank, world size and backend, chosen once (``get_world()``); the collectives
buckets        which rank owns which parameter (ZeRO's partition); flat buffers for collectives
data_parallel  ``DataParallel(stage=0..3)``: what ``train()`` calls to shard batches, reduce
               gradients, partition optimizer state, gradients and weights

Start the ranks with ``python -m minipeft.launch --nproc N -m MODULE ARGS...`` (or ``mpiexec``);
the memory arithmetic of each stage is ``minipeft.memory_zero``.
"""
from .buckets import DEFAULT_BUCKET_BYTES, Bucket, make_buckets, partition
from .data_parallel import STAGES, DataParallel, auto_data_parallel
from .world import BACKENDS, MPIWorld, NCCLWorld, World, detect_backend, get_world

__all__ = ["World", "MPIWorld", "NCCLWorld", "get_world", "detect_backend", "BACKENDS", "DataParallel",
           "auto_data_parallel", "STAGES", "partition", "make_buckets", "Bucket", "DEFAULT_BUCKET_BYTES"]
