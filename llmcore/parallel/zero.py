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
updates only its shard with Adam; stages 0-2 all-gather the new values, stage 3 keeps
only the shard and gathers a *unit* (a block) right before its forward and backward.
The optimizer is ``torch.optim.Adam`` on the shards: Adam is elementwise, so a sharded
step equals the unsharded one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmcore.parallel.comm import Comm, nbytes


class ZeroDataParallel(nn.Module):
    """Data parallel training with ZeRO ``stage`` 0-3; owns its Adam optimizer.

    ``units``: submodules gathered and freed as a whole at stage 3 (e.g. the blocks);
    parameters outside every unit form the root unit, gathered for the whole step.
    ``param_dtype``: dtype of the working parameters and gradients (bf16 for mixed
    precision); the master copy and Adam's moments are fp32.
    """

    def __init__(self, module: nn.Module, stage: int, group=None, units=(),
                 param_dtype: torch.dtype = torch.float32, lr: float = 1e-3,
                 betas=(0.9, 0.999), eps: float = 1e-8):
        super().__init__()
        if stage not in (0, 1, 2, 3):
            raise ValueError(f"stage must be 0, 1, 2 or 3, got {stage!r}")
        self.module, self.stage = module.to(param_dtype), stage
        self.comm = Comm(group)
        self.world = self.comm.world_size
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.master: dict[nn.Parameter, torch.Tensor] = {}  # fp32 shard (or whole)
        self.grad_shard: dict[nn.Parameter, torch.Tensor] = {}
        self.param_shard: dict[nn.Parameter, torch.Tensor] = {}  # stage 3
        with torch.no_grad():
            for p in self.params:
                self.comm.broadcast(p.data, src=0)  # replicas start equal
                whole = p.detach().reshape(-1).float()
                shard = whole.clone() if stage == 0 else self._shard(whole)
                self.master[p] = shard.requires_grad_()
        self.opt = torch.optim.Adam(list(self.master.values()), lr=lr, betas=betas,
                                    eps=eps)
        if stage >= 2:  # gradients leave as soon as they are accumulated
            for p in self.params:
                p.register_post_accumulate_grad_hook(self._reduce_scatter_grad)
        if stage == 3:
            self._setup_units(list(units))

    # ---------------------------------------------------------------- sharding
    def _padded(self, flat: torch.Tensor) -> torch.Tensor:
        return F.pad(flat, (0, -flat.numel() % self.world))

    def _shard(self, flat: torch.Tensor) -> torch.Tensor:
        return self._padded(flat).chunk(self.world)[self.comm.rank].clone()

    def _reduce(self, p: nn.Parameter) -> torch.Tensor:
        """This rank's part of the gradient summed over ranks (all of it at stage 0)."""
        g = self._padded(p.grad.reshape(-1))
        if self.stage == 0:
            self.comm.all_reduce(g)
            return g[:p.numel()]
        out = g.new_empty(g.numel() // self.world)
        self.comm.reduce_scatter(out, g)
        return out

    def _gather(self, shard: torch.Tensor, p: nn.Parameter) -> torch.Tensor:
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
        for u in units:
            ps = [p for p in u.parameters() if p.requires_grad]
            u.register_forward_pre_hook(lambda m, a, ps=ps: self._materialize(ps))
            u.register_forward_hook(lambda m, a, o, ps=ps: self._free(ps))
            u.register_full_backward_pre_hook(lambda m, g, ps=ps: self._materialize(ps))
        self.module.register_forward_pre_hook(lambda m, a: self._materialize(root))
        self._unit_of: dict[int, list] = {}
        for ps in [list(u.parameters()) for u in units] + [root]:
            self._unit_of.update({id(p): ps for p in ps})
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
    def step(self) -> None:
        """Average gradients, Adam on this rank's shard, bring parameters up to date."""
        for p in self.params:
            g = self.grad_shard.pop(p) if self.stage >= 2 else self._reduce(p)
            self.master[p].grad = g.float().div_(self.world)
        self.opt.step()
        for p in self.params:
            new = self.master[p].detach().to(p.dtype)
            if self.stage == 0:
                p.data.copy_(new.view_as(p))
            elif self.stage in (1, 2):
                p.data.copy_(self._gather(new, p))
            else:
                self.param_shard[p] = new

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None
            self.master[p].grad = None

    def state_bytes(self) -> dict[str, int]:
        """Bytes this rank holds now: parameters, gradients, optimizer state."""
        params = sum(p.untyped_storage().nbytes() for p in self.params)
        params += sum(nbytes(t) for t in self.param_shard.values())
        grads = sum(nbytes(p.grad) for p in self.params if p.grad is not None)
        grads += sum(nbytes(t) for t in self.grad_shard.values())
        opt = sum(nbytes(t) for t in self.master.values())
        opt += sum(nbytes(t) for s in self.opt.state.values() for t in s.values()
                   if t.dim() > 0)  # exp_avg, exp_avg_sq (not the step counter)
        return {"params": params, "grads": grads, "optimizer": opt}

    def full_parameters(self) -> dict[str, torch.Tensor]:
        """Every parameter, whole and fp32, gathered from the master shards."""
        names = {id(p): n for n, p in self.module.named_parameters()}
        out = {}
        for p in self.params:
            m = self.master[p].detach()
            out[names[id(p)]] = (m[:p.numel()].view_as(p) if self.stage == 0
                                 else self._gather(m, p).clone())
        return out


# ------------------------------------------------- the experiments the book runs


def units_of(model: nn.Module, name: str) -> list[nn.Module]:
    """The submodule ``name`` (each child if it is a ModuleList); none for ``""``."""
    if not name:
        return []
    m = model.get_submodule(name)
    return list(m) if isinstance(m, nn.ModuleList) else [m]


def train_adam_single(model_fn, data, lr: float = 1e-2, seed: int = 0) -> dict:
    """The reference: one process, the full batch, torch's Adam."""
    torch.manual_seed(seed)
    model = model_fn()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for x, y in zip(*data):
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _local_batches(data, rank: int, world_size: int):
    for x, y in zip(*data):
        yield x.chunk(world_size)[rank], y.chunk(world_size)[rank]


def zero_worker(rank: int, world_size: int, model_fn, stage: int, data,
                param_dtype: torch.dtype = torch.float32, units: str = "",
                lr: float = 1e-2, seed: int = 0) -> dict:
    """Train with ZeRO ``stage``; return weights, state bytes and payload per step."""
    torch.manual_seed(seed + rank)  # rank 1 differs on purpose: the broadcast fixes it
    model = model_fn()
    z = ZeroDataParallel(model, stage, units=units_of(model, units),
                         param_dtype=param_dtype, lr=lr)
    z.comm.stats.reset()  # count the training steps only, not the initial broadcast
    steps = 0
    for x, y in _local_batches(data, rank, world_size):
        _, loss = z(x, y)
        loss.backward()
        memory = z.state_bytes()  # after backward, before the step: the largest
        z.step()
        z.zero_grad()
        steps += 1
    payload = {k: v / steps for k, v in z.comm.stats.payload.items()}
    n = sum(p.numel() for p in z.params)
    return {"params": z.full_parameters(), "memory": memory, "numel": n,
            "payload_per_step": payload}


def fsdp_worker(rank: int, world_size: int, model_fn, data, units: str = "",
                lr: float = 1e-2, seed: int = 0) -> dict:
    """The same training with PyTorch's FSDP2 ``fully_shard`` (fp32)."""
    from torch.distributed.fsdp import fully_shard

    import warnings

    # FSDP2 warns about modules that return views; our models never modify them.
    warnings.filterwarnings("ignore", message=".*returned a view tensor")
    torch.manual_seed(seed)  # fully_shard keeps each rank's own values: start equal
    model = model_fn()
    for u in units_of(model, units):
        fully_shard(u)
    fully_shard(model)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for x, y in _local_batches(data, rank, world_size):
        _, loss = model(x, y)
        loss.backward()
        local = [p.to_local() for p in model.parameters()]
        memory = {"params": sum(nbytes(t) for t in local),
                  "grads": sum(nbytes(p.grad.to_local()) for p in model.parameters()),
                  "optimizer": sum(nbytes(t.to_local()) for s in opt.state.values()
                                   for t in s.values() if t.dim() > 0)}
        opt.step()
        opt.zero_grad()
    full = {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}
    return {"params": full, "memory": memory}


def zero_sweep(rank: int, world_size: int, model_fn, data, units: str = "",
               lr: float = 1e-2) -> dict:
    """Every stage in fp32 (for parity), every stage in bf16 (for memory), and FSDP2."""
    out = {s: zero_worker(rank, world_size, model_fn, s, data, units=units, lr=lr)
           for s in (0, 1, 2, 3)}
    out["bf16"] = {s: zero_worker(rank, world_size, model_fn, s, data, torch.bfloat16,
                                  units, lr)["memory"] for s in (0, 1, 2, 3)}
    out["fsdp"] = fsdp_worker(rank, world_size, model_fn, data, units, lr)
    return out
