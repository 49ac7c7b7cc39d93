"""ZeRO: data parallelism without N copies of the training state.

Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training Trillion Parameter
Models". With Adam in mixed precision a parameter costs 16 bytes: 2 for its bf16
value, 2 for its bf16 gradient, and 12 for the fp32 master copy and Adam's two moments.
Plain data parallelism keeps all 16 on every rank. ZeRO splits them over N ranks:

=====  ==========================================  ===============
stage  sharded                                     bytes/param
=====  ==========================================  ===============
0      nothing (data parallel)                     16
1      optimizer state (master, m, v)              4 + 12/N
2      + gradients (reduce-scattered in backward)  2 + 14/N
3      + parameters (all-gathered on demand)       16/N
=====  ==========================================  ===============

Every parameter is flattened, padded to a multiple of N and cut into N equal shards;
rank r owns shard r (the per-parameter sharding of FSDP2's ``fully_shard``). Rank r
updates only its shard; stages 0-2 all-gather the new values, stage 3 keeps only the
shard and gathers a *unit* (a block) right before its forward and backward. (FSDP2
is stage 3; with ``reshard_after_forward=False``, FSDP1's ``SHARD_GRAD_OP``, it keeps
the gathered weights from forward to backward, as stage 2 does.)

Communication in 8 bits (:mod:`llmcore.parallel.quantized_comm`):
``gather_format="e4m3"`` all-gathers the weights as FP8 codes with a scale per block
of ``comm_block`` values (the FP8 all-gather of FSDP weights); ``reduce_format``
reduce-scatters the gradients through 8-bit chunks summed in fp32 (ZeRO++'s
quantised gradients). Each halves the bytes of a bf16 collective; the master
weights and the update stay fp32, so only what travels is rounded.

The optimizer is any ``torch.optim`` optimizer built over the fp32 master shards by
:meth:`ZeroDataParallel.make_optimizer`; it trains in the book's one loop::

    zero = ZeroDataParallel(model, stage=2)
    opt = zero.make_optimizer(torch.optim.AdamW, lr=1e-3)
    train(zero, batch_fn, cfg, optimizer=opt, dp_group=dist.group.WORLD)

Two public optimizer hooks do the communication: before its step the averaged
gradient shards become the master shards' gradients, after it the new values go
back to the working parameters. An elementwise optimizer (SGD, Adam, AdamW) on the
shards then equals the unsharded one. ``clip_grad_norm_`` measures the norm over
all shards (one all-reduce), as FSDP's does.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from llmcore.parallel.comm import Comm, nbytes
from llmcore.parallel.quantized_comm import (FORMATS, quantized_all_gather,
                                             quantized_all_reduce,
                                             quantized_reduce_scatter)


class ZeroDataParallel(nn.Module):
    """Data parallel training with ZeRO ``stage`` 0-3.

    ``units``: submodules gathered and freed as a whole at stage 3 (e.g. the blocks);
    parameters outside every unit form the root unit, gathered for the whole step.
    ``param_dtype``: dtype of the working parameters and gradients (bf16 for mixed
    precision); the master copy and the optimizer's state are fp32.
    ``gather_format`` / ``reduce_format``: ``"e4m3"``, ``"e5m2"`` or ``"int8"`` to
    all-gather the weights / reduce the gradients in 8 bits, one fp32 scale per
    ``comm_block`` values; None: in ``param_dtype``, exactly.
    """

    def __init__(self, module: nn.Module, stage: int, group=None, units=(),
                 param_dtype: torch.dtype = torch.float32,
                 gather_format: str | None = None, reduce_format: str | None = None,
                 comm_block: int = 128):
        super().__init__()
        if stage not in (0, 1, 2, 3):
            raise ValueError(f"stage must be 0, 1, 2 or 3, got {stage!r}")
        for name, fmt in (("gather_format", gather_format),
                          ("reduce_format", reduce_format)):
            if fmt is not None and fmt not in FORMATS:
                raise ValueError(f"{name} must be None or one of {sorted(FORMATS)}, "
                                 f"got {fmt!r}")
        if gather_format is not None and stage == 0:
            raise ValueError("gather_format needs stage >= 1: stage 0 gathers no "
                             "weights")
        self.gather_format, self.reduce_format = gather_format, reduce_format
        self.comm_block = comm_block
        self.module, self.stage = module, stage
        self.comm = Comm(group)
        self.world = self.comm.world_size
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.master: dict[nn.Parameter, torch.Tensor] = {}  # fp32 shard (or whole)
        self.grad_shard: dict[nn.Parameter, torch.Tensor] = {}
        self.param_shard: dict[nn.Parameter, torch.Tensor] = {}  # stage 3
        self.optimizer: torch.optim.Optimizer | None = None
        self._reduced = False  # the master shards hold this step's gradients
        self._kept = 0  # gradient bytes backward left, once reduced
        with torch.no_grad():
            for t in [*module.parameters(), *module.buffers()]:
                self.comm.broadcast(t.data, src=0)  # replicas start equal, frozen too
            for p in self.params:  # from the fp32 weights, before the cast rounds them
                whole = p.detach().reshape(-1).float()
                shard = whole.clone() if stage == 0 else self._shard(whole)
                self.master[p] = shard.requires_grad_()
        module.to(param_dtype)  # the same Parameter objects, now in param_dtype
        if stage >= 2:  # gradients leave as soon as they are accumulated
            for p in self.params:
                p.register_post_accumulate_grad_hook(self._reduce_scatter_grad)
        if stage == 3:
            self._setup_units(list(units))

    def make_optimizer(self, cls=torch.optim.Adam, **kwargs) -> torch.optim.Optimizer:
        """``cls(master shards, **kwargs)``, hooked to this wrapper: its ``step()``
        first takes the averaged gradient shards, then publishes the new values."""
        opt = cls(list(self.master.values()), **kwargs)
        opt.register_step_pre_hook(lambda *args: self.reduce_gradients())
        opt.register_step_post_hook(lambda *args: self._after_step())
        self.optimizer = opt
        return opt

    # ---------------------------------------------------------------- sharding
    def _padded(self, flat: torch.Tensor) -> torch.Tensor:
        return F.pad(flat, (0, -flat.numel() % self.world))

    def _shard(self, flat: torch.Tensor) -> torch.Tensor:
        return self._padded(flat).chunk(self.world)[self.comm.rank].clone()

    def _reduce(self, p: nn.Parameter) -> torch.Tensor:
        """This rank's part of the gradient summed over ranks (all of it at stage 0)."""
        g = self._padded(p.grad.reshape(-1))
        fmt, block = self.reduce_format, self.comm_block
        if self.stage == 0:
            if fmt is not None:
                return quantized_all_reduce(self.comm, g, fmt, block)[:p.numel()]
            self.comm.all_reduce(g)
            return g[:p.numel()]
        if fmt is not None:  # summed in fp32, kept in the gradients' dtype
            return quantized_reduce_scatter(self.comm, g, fmt, block).to(g.dtype)
        out = g.new_empty(g.numel() // self.world)
        self.comm.reduce_scatter(out, g)
        return out

    def _gather(self, shard: torch.Tensor, p: nn.Parameter,
                exact: bool = False) -> torch.Tensor:
        """The whole parameter from every rank's shard; the weights a forward uses
        travel in ``gather_format`` unless ``exact``."""
        if self.gather_format is not None and not exact:
            full = quantized_all_gather(self.comm, shard, self.gather_format,
                                        self.comm_block).to(p.dtype)
        else:
            full = shard.new_empty(shard.numel() * self.world)
            self.comm.all_gather(full, shard)
        return full[:p.numel()].view_as(p)

    def _reduce_scatter_grad(self, p: nn.Parameter) -> None:
        shard = self._reduce(p)
        if p in self.grad_shard:  # a second backward without a step: accumulate
            shard = shard + self.grad_shard[p]
        self.grad_shard[p] = shard
        p.grad = None  # the full gradient is freed right away

    # ---------------------------------------------------------------- stage 3
    def _setup_units(self, units: list[nn.Module]) -> None:
        in_unit = {id(p) for u in units for p in u.parameters()}
        root = [p for p in self.params if id(p) not in in_unit]
        for p in self.params:
            self.param_shard[p] = self._shard(p.detach().reshape(-1))
            p.untyped_storage().resize_(0)  # the full parameter is gone until needed
        # Only trainable parameters are sharded; frozen ones stay whole.
        self._units = [[p for p in u.parameters() if p.requires_grad] for u in units]
        self._units.append(root)
        for u, ps in zip(units, self._units):
            u.register_forward_pre_hook(lambda m, a, ps=ps: self._materialize(ps))
            u.register_forward_hook(lambda m, a, o, ps=ps: self._free(ps))
            u.register_full_backward_pre_hook(lambda m, g, ps=ps: self._materialize(ps))
        self.module.register_forward_pre_hook(lambda m, a: self._materialize(root))
        self._unit_of = {id(p): ps for ps in self._units for p in ps}
        self._pending: dict[int, int] = {}
        for p in self.params:  # after the last gradient of a unit, free the unit
            p.register_post_accumulate_grad_hook(self._maybe_free_unit)

    def _materialize(self, ps) -> None:
        for p in ps:
            if p.untyped_storage().nbytes() == 0:
                full = self._gather(self.param_shard[p], p)
                p.untyped_storage().resize_(nbytes(p))
                # .data: the copy must not bump the version autograd saved
                p.data.copy_(full)

    def _free(self, ps) -> None:
        for p in ps:
            p.untyped_storage().resize_(0)

    def _maybe_free_unit(self, p: nn.Parameter) -> None:
        # A unit with a parameter that got no gradient stays whole until the step.
        unit = self._unit_of[id(p)]
        key = id(unit)
        self._pending[key] = self._pending.get(key, len(unit)) - 1
        if self._pending[key] == 0:
            del self._pending[key]
            self._free(unit)

    # ---------------------------------------------------------------- training
    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    @torch.no_grad()
    def reduce_gradients(self) -> None:
        """Average the gradients over the ranks into the master shards' ``grad``
        (once per step; the optimizer's step calls it).

        A parameter that received no gradient (unused in this step, on every rank)
        gets none, as torch's optimizers skip a parameter whose ``grad`` is None.
        """
        if self._reduced:
            return
        self._kept = self._grad_bytes()  # what backward left, for state_bytes()
        for p in self.params:
            if self.stage >= 2:
                g = self.grad_shard.pop(p, None)
            else:
                g = self._reduce(p) if p.grad is not None else None
            self.master[p].grad = None if g is None else g.float().div_(self.world)
        self._reduced = True

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Scale the averaged gradients to a global 2-norm of at most ``max_norm``
        (``math.inf``: measure only); return the norm before clipping."""
        self.reduce_gradients()
        grads = [m.grad for m in self.master.values() if m.grad is not None]
        device = next(iter(self.master.values())).device
        sq = torch.zeros((), device=device)
        for g in grads:
            sq += g.pow(2).sum()  # padding is zero: it adds nothing
        if self.stage > 0:  # each rank holds a different part of the gradient
            dist.all_reduce(sq, group=self.comm.group)  # a scalar: not in the payload
        total = sq.sqrt()
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for g in grads:
            g.mul_(coef)
        return total

    @torch.no_grad()
    def _after_step(self) -> None:
        """The new master values back into the working parameters; forget the
        step's gradients."""
        for p in self.params:
            new = self.master[p].detach().to(p.dtype)
            if self.stage == 0:
                p.data.copy_(new.view_as(p))
            elif self.stage in (1, 2):
                p.data.copy_(self._gather(new, p))
            else:
                self.param_shard[p] = new
        if self.stage == 3:  # the next forward gathers the new values
            self._free(self.params)
            self._pending.clear()
        self.zero_grad()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Forget every gradient, also the shards a backward without a step left."""
        self.grad_shard.clear()
        self._reduced = False
        for p in self.params:
            p.grad = None
            self.master[p].grad = None

    def _grad_bytes(self) -> int:
        grads = sum(nbytes(p.grad) for p in self.params if p.grad is not None)
        return grads + sum(nbytes(t) for t in self.grad_shard.values())

    def state_bytes(self) -> dict[str, int]:
        """Bytes this rank holds now: parameters, gradients, optimizer state.

        Gradients are counted as backward leaves them (``param_dtype``, whole or
        sharded) until the step ends; the fp32 copy the update reads is transient,
        as in the ZeRO paper's count."""
        params = sum(p.untyped_storage().nbytes() for p in self.params)
        params += sum(nbytes(t) for t in self.param_shard.values())
        grads = self._kept if self._reduced else self._grad_bytes()
        opt = sum(nbytes(t) for t in self.master.values())
        state = self.optimizer.state.values() if self.optimizer is not None else ()
        opt += sum(nbytes(t) for s in state for t in s.values()
                   if torch.is_tensor(t) and t.dim() > 0)  # moments, not step counts
        return {"params": params, "grads": grads, "optimizer": opt}

    def full_parameters(self) -> dict[str, torch.Tensor]:
        """Every parameter, whole and fp32, gathered from the master shards."""
        names = {id(p): n for n, p in self.module.named_parameters()}
        out = {}
        for p in self.params:
            m = self.master[p].detach()
            out[names[id(p)]] = (m[:p.numel()].view_as(p) if self.stage == 0
                                 else self._gather(m, p, exact=True).clone())
        return out
