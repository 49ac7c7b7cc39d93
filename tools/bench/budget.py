"""Will the gpu tier fit, and how long will it take? Checked on the CPU, before any GPU.

Every gpu-tier preset, in ``llmcore`` and in the notebooks, is turned into a
``Workload`` (a GPT of its depth and width, trained at its batch and context), the
model is built on the meta device (shapes only, no memory), and its training memory
is added up: weights, gradients and AdamW state from ``llmcore.accounting``, plus
the activations the blocks save in bf16 (``llmcore.parallel.activations``, the count
checked against what autograd saves: 16 C bytes per token and layer in 16-bit with a
fused attention kernel, the norms' statistics in fp32 as on CUDA; the T x T scores
too without one) and the fp32 logits.
It must fit the budget the preset declares: 16 GiB (``GPU_BUDGET_GB``), or the GiB key
of a ``rt.fit({GiB: preset})`` option. The run time on an H100 is estimated from the
FLOPs (``tools.bench.mfu``) at a stated utilisation.

How presets are found in a notebook: its code cells are parsed, and only the top-level
imports, class definitions and assignments whose value builds a ``Tiered(...)`` (also
inside ``rt.pick(...)``) or a ``rt.fit({...})`` are executed; nothing else runs. A gpu
value describes a model when it (or a field of it) has a depth (``n_layer``,
``layers``; an encoder-decoder counts both stacks) and a width (``n_embd``,
``d_model``); its batch, context and steps come
from its own fields, then its container's, then the notebook's ``*BATCH*`` and
``*STEPS*`` presets. A model with no step count is only built, and is checked at batch
1; a vocabulary left as a placeholder (1, set later from a tokenizer) is taken as 4096,
the largest vocabulary a tokenizer trained in the book has (GPT-2's is declared).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import importlib
import pkgutil
import sys
import types
from dataclasses import dataclass

import torch

import llmcore
from llmcore.accounting import count_params, flops_per_token, training_bytes
from llmcore.config import GPU_BUDGET_GB, Tiered
from llmcore.models.gpt import GPT, GPTConfig
from llmcore.parallel.activations import block_activation_bytes


GiB = 2**30
H100_BF16_FLOPS = 989e12  # H100 SXM dense bf16 tensor-core peak (datasheet)
UTILISATION = 0.3  # assumed MFU; small models reach less, so times are a floor
CUDA_CONTEXT = 1 * GiB  # the CUDA context, cuBLAS workspaces, allocator slack
PLACEHOLDER_VOCAB = 4096
ROLES = {  # role -> field names that carry it, first match wins
    "n_layer": ("n_layer", "layers", "n_layers"),
    "n_embd": ("n_embd", "d_model"),
    "n_head": ("n_head", "n_heads"),
    "vocab": ("vocab_size", "vocab", "tgt_vocab"),
    "context": ("block_size", "context", "seq_len", "max_len", "block"),
    "batch": ("batch_size", "batch"),
    "steps": ("max_steps", "steps", "pretrain_steps"),
}


@dataclass(frozen=True)
class Workload:
    """A model trained on a GPU: what memory and time depend on."""

    source: str  # where the preset is defined
    n_layer: int
    n_embd: int
    n_head: int
    vocab_size: int
    context: int  # tokens per sequence
    batch: int  # sequences per step
    steps: int  # optimizer steps (0: the model is only built)
    budget_gb: float = GPU_BUDGET_GB  # the memory the page may use


@functools.lru_cache(maxsize=256)
def meta_gpt(vocab_size: int, context: int, n_layer: int, n_head: int,
             n_embd: int) -> GPT:
    """The GPT on the meta device (shapes only), built once per shape: the table
    asks for each preset several times, and a build is a tenth of a second."""
    with torch.device("meta"):
        return GPT(GPTConfig(vocab_size, context, n_layer, n_head, n_embd))


def workload_gpt(w: Workload) -> GPT:
    head = w.n_head if w.n_embd % w.n_head == 0 else 1  # the heads do not change N
    return meta_gpt(w.vocab_size, w.context, w.n_layer, head, w.n_embd)


def memory(w: Workload, fused_attention: bool = True) -> dict[str, float]:
    """Training bytes of ``w``, by part; the model is built on the meta device."""
    model = workload_gpt(w)
    head = model.config.n_head
    state = training_bytes(count_params(model), "mixed bf16 + AdamW")
    tokens = w.context * w.batch
    per_token = block_activation_bytes(w.n_embd, head, w.context, dtype_bytes=2,
                                       fused_attention=fused_attention,
                                       stats_bytes=4)  # CUDA keeps them in fp32
    return {"params": count_params(model), "weights": state["weights"],
            "grads": state["grads"], "master+optimizer": state["master"] + state[
                "optimizer"], "activations": w.n_layer * tokens * per_token,
            "logits": 2 * 4 * tokens * w.vocab_size, "cuda": CUDA_CONTEXT}


def total_bytes(w: Workload) -> float:
    return sum(v for k, v in memory(w).items() if k != "params")


def fits(w: Workload) -> bool:
    return total_bytes(w) <= w.budget_gb * GiB


def h100_seconds(w: Workload) -> float:
    """Estimated training time of ``w`` on one H100 at ``UTILISATION``."""
    flops = flops_per_token(workload_gpt(w).config) * w.batch * w.context * w.steps
    return flops / (UTILISATION * H100_BF16_FLOPS)


# ---------------------------------------------------------------- finding presets

def fields_of(obj) -> dict | None:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return obj
    if isinstance(obj, tuple) and hasattr(obj, "_asdict"):
        return obj._asdict()
    return None


def scalars(f: dict) -> dict[str, int]:
    """The roles an object's integer fields carry, and one level down (``train``)."""
    found: dict[str, int] = {}
    nested = [v for v in f.values() if fields_of(v) is not None]
    for source in [f] + [fields_of(v) for v in nested]:
        for role, names in ROLES.items():
            for name in names:
                value = source.get(name)
                if isinstance(value, int) and not isinstance(value, bool):
                    found.setdefault(role, value)
                    break
    return found


def workloads(obj, source: str, context: dict, budget: float) -> list[Workload]:
    """Every model described by ``obj`` (recursively), with inherited context."""
    f = fields_of(obj)
    if f is None:
        if isinstance(obj, (list, tuple)):
            return [w for x in obj for w in workloads(x, source, context, budget)]
        return []
    own = {**context, **scalars(f)}
    found = []
    if "n_enc_layers" in f:  # an encoder-decoder: checked as a GPT of both depths
        own["n_layer"] = f["n_enc_layers"] + f.get("n_dec_layers", 0)
    if "n_layer" in own and any(k in f for k in ROLES["n_embd"]):
        vocab = own.get("vocab", 1)
        steps = own.get("steps", 0)
        depth = own["n_layer"]
        found.append(Workload(
            source, depth, own["n_embd"], own.get("n_head", 1),
            vocab if vocab > 1 else PLACEHOLDER_VOCAB, own.get("context", 256),
            own.get("batch", 64) if steps else 1, steps, budget))
    for value in f.values():
        if fields_of(value) is not None or isinstance(value, (list, tuple)):
            found += [w for w in workloads(value, source, own, budget)
                      if w not in found]
    return found


class FitOptions(dict):
    """The options of a ``rt.fit({GiB: preset})`` call, found in a notebook."""


def callee(call: ast.Call) -> str:
    """``f`` for ``f(...)`` and for ``obj.f(...)``."""
    return getattr(call.func, "attr", getattr(call.func, "id", ""))


def preset_statements(code: str) -> list[ast.stmt]:
    """The top-level statements of a cell that define presets (and what they need)."""
    lines = [ln for ln in code.splitlines() if not ln.lstrip().startswith(("%", "!"))]
    try:
        tree = ast.parse("\n".join(lines))
    except SyntaxError:
        return []
    keep = []
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom, ast.ClassDef)):
            keep.append(node)
        elif isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
            call = node.value
            name = callee(call)
            if name == "pick" and call.args and isinstance(call.args[0], ast.Call):
                node.value = call = call.args[0]  # rt.pick(Tiered(...)) -> Tiered(...)
                name = callee(call)
            if name == "fit" and call.args and isinstance(call.args[0], ast.Dict):
                node.value = ast.Call(ast.Name("FitOptions", ast.Load()),
                                      [call.args[0]], [])
                keep.append(node)
            elif name == "Tiered":
                keep.append(node)
    return [ast.fix_missing_locations(n) for n in keep]


def notebook_presets(cells: list[str], source: str) -> tuple[list[Workload], list]:
    """(workloads, statements that failed) of a notebook's code cells."""
    # A module of its own, so that dataclasses defined in the cells work.
    module = types.ModuleType("llmcore_notebook_presets")
    ns = vars(module)
    ns["FitOptions"] = FitOptions
    assigned, failed = [], []
    sys.modules[module.__name__] = module
    try:
        for code in cells:
            for node in preset_statements(code):
                try:
                    exec(compile(ast.Module([node], []), source, "exec"), ns)
                except Exception as exc:  # e.g. a preset built from a run's results
                    failed.append((node.lineno, f"{type(exc).__name__}: {exc}"))
                    continue
                if isinstance(node, ast.Assign):
                    assigned += [t.id for t in node.targets
                                 if isinstance(t, ast.Name)]
    finally:
        del sys.modules[module.__name__]
    return collect(ns, assigned, source), failed


def gpu_value(ns: dict, role: str) -> int | None:
    """The largest int gpu value of the presets whose name contains ``role``; for
    steps also the ``max_steps`` of a gpu ``TrainConfig``-like preset."""
    values = [v.gpu for k, v in ns.items() if role in k.upper()
              and isinstance(v, Tiered) and isinstance(v.gpu, int)
              and not isinstance(v.gpu, bool)]
    if role == "STEPS":
        values += [v.gpu.max_steps for v in ns.values() if isinstance(v, Tiered)
                   and isinstance(getattr(v.gpu, "max_steps", None), int)]
    return max(values) if values else None


def collect(ns: dict, names: list[str], source: str) -> list[Workload]:
    """Workloads of the presets bound to ``names`` in namespace ``ns``."""
    context = {}
    for role in ("batch", "steps"):
        mine = {n: ns[n] for n in names if n in ns}
        if (value := gpu_value(mine, role.upper())) is not None:
            context[role] = value
    found: list[Workload] = []
    for name in dict.fromkeys(names):
        obj = ns.get(name)
        where = f"{source}:{name}"
        if isinstance(obj, Tiered):
            found += workloads(obj.gpu, where, context, GPU_BUDGET_GB)
        elif isinstance(obj, FitOptions):
            for gib, preset in obj.items():
                found += workloads(preset, f"{where}[{gib}]", context, float(gib))
        elif isinstance(obj, dict) and all(isinstance(v, Tiered) for v in obj.values()):
            for key, tiered in obj.items():
                found += workloads(tiered.gpu, f"{where}[{key}]", context,
                                   GPU_BUDGET_GB)
    return found


def table(rows: list[Workload]) -> str:
    """A text table: model, memory against budget, estimated H100 minutes."""
    out = [f"{'preset':58s} {'params':>8s} {'GiB':>6s} {'budget':>6s} {'H100 min':>8s}"]
    for w in rows:
        n = memory(w)["params"]
        out.append(f"{w.source[-58:]:58s} {n / 1e6:7.1f}M {total_bytes(w) / GiB:6.1f} "
                   f"{w.budget_gb:6.0f} {h100_seconds(w) / 60:8.2f}")
    return "\n".join(out)


def library_presets() -> list[Workload]:
    """Workloads of the gpu presets defined at module level in ``llmcore``."""
    found: list[Workload] = []
    for info in pkgutil.walk_packages(llmcore.__path__, "llmcore."):
        if info.name.split(".")[-1].startswith("_") or ".book" in info.name:
            continue
        module = importlib.import_module(info.name)  # the tooling imports no GPU code
        names = [n for n in vars(module) if not n.startswith("_")]
        found += collect(vars(module), names, info.name)
    unique: dict = {}
    for w in found:
        unique.setdefault(dataclasses.replace(w, source=""), w)
    return list(unique.values())


def main(argv: list[str]) -> int:
    """``python -m tools.bench budget``: the table for llmcore's own gpu presets."""
    rows = library_presets()
    print(table(rows))
    return 0 if all(fits(w) for w in rows) else 1
