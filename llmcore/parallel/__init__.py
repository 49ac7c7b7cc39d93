"""Parallel training by hand, on several processes: data, ZeRO, tensor, pipeline,
context (ring attention).

Every scheme runs in any initialised process group, gloo on the CPU or NCCL on GPUs
(``torchrun``, or the book's runner ``book/workers/launch.py``), and is checked against
a single process and against PyTorch's own implementation. The experiments the
chapters run on top of them (workers, sweeps, timelines) live in ``book.workers``,
which nothing here imports.
"""

from llmcore.parallel.comm import Comm, CommStats, HookState, allreduce_hook
from llmcore.parallel.context_parallel import ContextParallel, ContextParallelAttention
from llmcore.parallel.data_parallel import BucketedDataParallel, NaiveDataParallel
from llmcore.parallel.tensor_parallel import (ColumnParallelLinear, RowParallelLinear,
                                              VocabParallelEmbedding,
                                              apply_tensor_parallel)
from llmcore.parallel.zero import ZeroDataParallel

__all__ = ["BucketedDataParallel", "ColumnParallelLinear", "Comm", "CommStats",
           "ContextParallel", "ContextParallelAttention",
           "HookState", "NaiveDataParallel", "RowParallelLinear",
           "VocabParallelEmbedding", "ZeroDataParallel",
           "allreduce_hook", "apply_tensor_parallel"]
