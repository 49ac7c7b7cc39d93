"""Data parallelism by hand: every rank holds the whole model and a slice of the batch.

After backward each rank holds the gradient of *its* slice; averaging the gradients
over ranks (an all-reduce divided by N) gives every rank the gradient of the whole
batch, so the optimizer steps agree and the replicas stay identical.

* :class:`NaiveDataParallel` waits for the whole backward pass, then all-reduces the
  gradients one tensor at a time: simple, slow (many small messages, no overlap).
* :class:`BucketedDataParallel` groups gradients into buckets of ``bucket_cap_mb``
  and launches an asynchronous all-reduce as soon as a bucket's gradients are all
  accumulated, while backward keeps computing the earlier layers (Li et al. 2020,
  "PyTorch Distributed: Experiences on Accelerating Data Parallel Training").
  The bucket's reduction is a communication hook ``hook(state, bucket) -> Future``
  exactly like ``DistributedDataParallel.register_comm_hook``, so the compression
  hooks of ``llmcore.parallel.compression`` plug into both.

Both mirror ``torch.nn.parallel.DistributedDataParallel``: parameters are broadcast
from rank 0 at construction, gradients are averaged during ``loss.backward()``, and
``no_sync()`` skips the reduction for gradient accumulation.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from llmcore.config import Tiered, check_positive
from llmcore.parallel.comm import Comm, HookState, allreduce_hook


class _DataParallel(nn.Module):
    """What both wrappers share: broadcast, forward, no_sync, end of backward."""

    def __init__(self, module: nn.Module, group: dist.ProcessGroup | None = None):
        super().__init__()
        self.module = module
        self.group = group
        self.comm = Comm(group)
        self.world_size = self.comm.world_size
        with torch.no_grad():  # every replica starts from rank 0's weights
            for t in list(module.parameters()) + list(module.buffers()):
                self.comm.broadcast(t.data, src=0)
        self.params = [p for p in module.parameters() if p.requires_grad]
        self._sync = True
        self._ready = 0  # parameters whose gradient is accumulated in this backward
        for p in self.params:
            p.register_post_accumulate_grad_hook(self._on_grad)

    def forward(self, *args, **kwargs):
        if self._ready:
            raise RuntimeError(
                f"only {self._ready} of {len(self.params)} parameters received a "
                "gradient in the last backward; every parameter must take part in "
                "the loss (freeze unused ones with requires_grad_(False))")
        return self.module(*args, **kwargs)

    @contextlib.contextmanager
    def no_sync(self):
        """Accumulate gradients locally; the first backward after the block syncs."""
        old, self._sync = self._sync, False
        try:
            yield
        finally:
            self._sync = old

    def _on_grad(self, p: torch.Tensor) -> None:
        if not self._sync:
            return
        self._grad_ready(p)
        self._ready += 1
        # The last parameter's gradient is in: backward has nothing left to compute.
        if self._ready == len(self.params):
            self._ready = 0
            self._backward_done()

    def _grad_ready(self, p: torch.Tensor) -> None:
        pass

    def _backward_done(self) -> None:
        raise NotImplementedError


class NaiveDataParallel(_DataParallel):
    """All-reduce every gradient, one tensor at a time, after backward has finished."""

    def _backward_done(self) -> None:
        for p in self.params:
            self.comm.all_reduce(p.grad)
            p.grad.div_(self.world_size)

    @property
    def bytes_sent(self) -> int:
        return self.comm.stats.payload["all_reduce"]


class GradBucket:
    """What a communication hook sees; mirrors ``torch.distributed.GradBucket``."""

    def __init__(self, index: int, params: list[torch.Tensor]):
        self._index = index
        self._params = params
        p0 = params[0]
        self._buffer = torch.zeros(sum(p.numel() for p in params), dtype=p0.dtype,
                                   device=p0.device)
        self._is_last = False
        self.pending = 0  # gradients of this bucket not yet accumulated

    def index(self) -> int:
        return self._index

    def buffer(self) -> torch.Tensor:
        return self._buffer

    def set_buffer(self, buffer: torch.Tensor) -> None:
        self._buffer = buffer

    def is_last(self) -> bool:
        return self._is_last

    def parameters(self) -> list[torch.Tensor]:
        return list(self._params)

    def gradients(self) -> list[torch.Tensor]:
        """Views of the flat buffer shaped like each parameter."""
        views, offset = [], 0
        for p in self._params:
            views.append(self._buffer[offset:offset + p.numel()].view_as(p))
            offset += p.numel()
        return views


def make_buckets(params: list[torch.Tensor], cap_bytes: int) -> list[GradBucket]:
    """Fill buckets in reverse order, the order in which backward produces gradients."""
    groups: list[list[torch.Tensor]] = [[]]
    size = 0
    for p in reversed(params):
        nb = p.numel() * p.element_size()
        if groups[-1] and (size + nb > cap_bytes or p.dtype != groups[-1][0].dtype):
            groups.append([])
            size = 0
        groups[-1].append(p)
        size += nb
    buckets = [GradBucket(i, g) for i, g in enumerate(groups)]
    buckets[-1]._is_last = True
    return buckets


class BucketedDataParallel(_DataParallel):
    """Buckets of gradients all-reduced asynchronously while backward still runs."""

    def __init__(self, module: nn.Module, group: dist.ProcessGroup | None = None,
                 bucket_cap_mb: float = 25.0):
        super().__init__(module, group)
        self.buckets = make_buckets(self.params, int(bucket_cap_mb * 2**20))
        self._bucket_of = {id(p): b for b in self.buckets for p in b.parameters()}
        for b in self.buckets:
            b.pending = len(b.parameters())
        self._futures: list[tuple[GradBucket, torch.futures.Future]] = []
        self.register_comm_hook(HookState(group), allreduce_hook)

    def register_comm_hook(self, state, hook) -> None:
        """Use ``hook(state, bucket) -> Future[Tensor]`` to reduce each bucket."""
        self.hook_state, self.hook = state, hook

    def _grad_ready(self, p: torch.Tensor) -> None:
        bucket = self._bucket_of[id(p)]
        bucket.pending -= 1
        if bucket.pending == 0:  # the bucket is full: send it while backward goes on
            bucket.pending = len(bucket.parameters())
            for view, q in zip(bucket.gradients(), bucket.parameters()):
                view.copy_(q.grad)
            self._futures.append((bucket, self.hook(self.hook_state, bucket)))

    def _backward_done(self) -> None:
        for bucket, fut in self._futures:
            reduced = fut.wait()
            if isinstance(reduced, list):  # a raw Work future holds a list
                reduced = reduced[0]
            if reduced is not bucket.buffer():
                bucket.buffer().copy_(reduced)
            for view, q in zip(bucket.gradients(), bucket.parameters()):
                q.grad.copy_(view)
        self._futures.clear()

    @property
    def bytes_sent(self) -> int:
        return self.hook_state.bytes_sent


# ------------------------------------------------- the experiments the book runs


@dataclass(frozen=True)
class DemoConfig:
    """The GPT and the run that the parallel chapters train on gloo processes."""

    n_layer: int  # blocks (a multiple of the pipeline stages)
    n_head: int  # heads (a multiple of the tensor-parallel ranks)
    n_embd: int  # model width C
    block_size: int  # context T
    batch: int  # global batch, split across data-parallel ranks
    steps: int  # training steps per run
    lr: float  # SGD learning rate

    def __post_init__(self):
        check_positive(self, "n_layer", "n_head", "n_embd", "block_size", "batch",
                       "steps", "lr")

    def gpt_config(self, vocab_size: int):
        from llmcore.models.gpt import GPTConfig

        return GPTConfig(vocab_size=vocab_size, block_size=self.block_size,
                         n_layer=self.n_layer, n_head=self.n_head, n_embd=self.n_embd)


# The hand-written schemes run on CPU processes on both tiers (gloo); the gpu tier
# only trains a larger model for longer.
DEMO = Tiered(cpu=DemoConfig(2, 4, 32, 32, 8, 20, 0.5),
              gpu=DemoConfig(4, 4, 128, 64, 32, 200, 0.5))


def shakespeare_batches(demo: DemoConfig, seed: int = 0, chars: int = 200_000):
    """(GPTConfig, (X, Y)): character batches (steps, batch, T) of Shakespeare."""
    from llmcore.data import load_corpus
    from llmcore.data.lm import get_batch
    from llmcore.tokenizer.char import CharTokenizer

    text = load_corpus("shakespeare")
    tok = CharTokenizer.train(text)  # the whole corpus: every character has an id
    ids = torch.tensor(tok.encode(text[:chars]))
    g = torch.Generator().manual_seed(seed)
    xs, ys = zip(*(get_batch(ids, demo.batch, demo.block_size, generator=g)
                   for _ in range(demo.steps)))
    return demo.gpt_config(tok.vocab_size), (torch.stack(xs), torch.stack(ys))


class TinyLM(nn.Module):
    """A stand-in for a GPT with its forward signature, small enough for unit tests."""

    def __init__(self, vocab_size: int = 32, n_embd: int = 16, hidden: int = 32):
        super().__init__()
        self.emb = nn.Embedding(vocab_size, n_embd)
        self.mlp = nn.Sequential(nn.Linear(n_embd, hidden), nn.GELU(),
                                 nn.Linear(hidden, n_embd))
        self.head = nn.Linear(n_embd, vocab_size)

    def forward(self, idx, targets=None):
        x = self.emb(idx)  # (B, T, C)
        logits = self.head(x + self.mlp(x))  # (B, T, V)
        loss = None
        if targets is not None:
            loss = nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits, loss


def random_batches(steps: int, batch: int, seq: int, vocab: int, seed: int = 0):
    """Token batches (steps, batch, seq) and their next-token targets, reproducibly."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(vocab, (steps, batch, seq + 1), generator=g)
    return tokens[..., :-1].contiguous(), tokens[..., 1:].contiguous()


def wrap(kind: str, model: nn.Module, group=None, bucket_cap_mb: float = 25.0):
    """The data-parallel wrapper named ``kind``: naive, bucketed or ddp (PyTorch's)."""
    if kind == "naive":
        return NaiveDataParallel(model, group)
    if kind == "bucketed":
        return BucketedDataParallel(model, group, bucket_cap_mb=bucket_cap_mb)
    if kind == "ddp":
        return nn.parallel.DistributedDataParallel(
            model, process_group=group, bucket_cap_mb=bucket_cap_mb)
    raise ValueError(f"kind must be 'naive', 'bucketed' or 'ddp', got {kind!r}")


def train_single(model_fn, data, lr: float = 0.1, seed: int = 0) -> dict:
    """The reference: one process, the full batch, plain SGD."""
    torch.manual_seed(seed)
    model = model_fn()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    losses = []
    for x, y in zip(*data):
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return {"state": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "losses": losses}


def train_worker(rank: int, world_size: int, model_fn, kind: str, data,
                 lr: float = 0.1, accumulate: int = 1, hook: str | None = None,
                 bucket_cap_mb: float = 25.0, seed: int = 0, **hook_kwargs) -> dict:
    """Train on this rank's slice of every batch, in ``accumulate`` micro-batches.

    ``hook`` names a compression hook of ``llmcore.parallel.compression``. Returns the
    final weights, the global loss per step, the payload bytes sent and seconds/step.
    """
    import time

    torch.manual_seed(seed + rank)  # rank 1 differs on purpose: the broadcast fixes it
    model = model_fn()
    dp = wrap(kind, model, bucket_cap_mb=bucket_cap_mb)
    state = None
    if hook is not None:
        from llmcore.parallel.compression import make_hook
        state, fn = make_hook(hook, **hook_kwargs)
        dp.register_comm_hook(state, fn)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    losses, start = [], time.perf_counter()
    for x, y in zip(*data):
        micro = list(zip(x.chunk(world_size)[rank].chunk(accumulate),
                         y.chunk(world_size)[rank].chunk(accumulate)))
        total = torch.zeros(())
        for i, (xm, ym) in enumerate(micro):
            last = i == len(micro) - 1
            with contextlib.nullcontext() if last else dp.no_sync():
                _, loss = dp(xm, ym)
                (loss / accumulate).backward()
            total += loss.detach() / accumulate
        opt.step()
        opt.zero_grad()
        dist.all_reduce(total)
        losses.append(total.item() / world_size)
    seconds = (time.perf_counter() - start) / len(losses)
    sent = getattr(state if state is not None else dp, "bytes_sent", None)
    return {"state": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "losses": losses, "bytes_sent": sent, "seconds_per_step": seconds}


def max_abs_diff(a: dict, b: dict) -> float:
    """Largest difference between two state dicts with the same keys."""
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def dp_sweep(rank: int, world_size: int, model_fn, data, lr: float,
             bucket_cap_mb: float = 25.0) -> dict:
    """Naive, bucketed and DDP training, and bucketed with 2 micro-batches per rank."""
    runs = {kind: train_worker(rank, world_size, model_fn, kind, data, lr,
                               bucket_cap_mb=bucket_cap_mb)
            for kind in ("naive", "bucketed", "ddp")}
    runs["accumulate"] = train_worker(rank, world_size, model_fn, "bucketed", data, lr,
                                      accumulate=2, bucket_cap_mb=bucket_cap_mb)
    return runs
