"""The gpu-tier presets of the book, found without running the pages.

Every gpu-tier preset, in ``llmcore``, in the tools and in the notebooks, becomes a
:class:`Workload`: a GPT of its depth and width trained at its batch, context and
steps, with the precision, attention kernel, evaluation and compilation it asks for.
``tools.bench.plan`` turns workloads into memory and minutes per device class.

How presets are found in a notebook: its code cells are parsed, and only the top-level
imports, class definitions and assignments whose value builds a ``Tiered(...)`` (also
inside ``rt.pick(...)``) or a ``rt.fit({...})`` are executed; nothing else runs. A gpu
value describes a model when it (or a field of it) has a depth (``n_layer``,
``layers``; an encoder-decoder counts both stacks) and a width (``n_embd``,
``d_model``); its batch, context and steps come from its own fields, then its
container's, then the notebook's ``*BATCH*`` and ``*STEPS*`` presets. A model with no
step count is only built, and is checked at batch 1; a vocabulary left as a
placeholder (1, set later from a tokenizer) is taken as 4096, the largest vocabulary a
tokenizer trained in the book has (GPT-2's is declared). The options of a
``rt.fit({GiB: preset})`` keep their GiB as the memory they may use.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import pkgutil
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import llmcore
from llmcore.config import Tiered

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
    """A model trained on a GPU: what its memory and time depend on."""

    source: str  # where the preset is defined
    n_layer: int
    n_embd: int
    n_head: int
    vocab_size: int
    context: int  # tokens per sequence
    batch: int  # sequences per step
    steps: int  # optimizer steps (0: the model is only built)
    budget_gb: float | None = None  # declared by rt.fit; None: the device's memory
    precision: str | None = None  # fixed by the page; None: the device's (rt.precision)
    fused_attention: bool = True  # SDPA (use_sdpa) or the hand-written T x T kernel
    compile: bool = False  # torch.compile: a compilation before the first step
    eval_interval: int = 0  # evaluate every this many steps (0: once, at the end)
    eval_steps: int = 0  # batches per evaluation


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


def flags(f: dict) -> dict:
    """The precision, attention kernel, evaluation and compilation a preset (or its
    ``train`` field) asks for, where it says."""
    found: dict = {}
    nested = [fields_of(v) for v in f.values() if fields_of(v) is not None]
    for source in [f, *nested]:
        for key in ("precision", "use_sdpa", "compile", "eval_interval", "eval_steps"):
            if key in source and key not in found:
                found[key] = source[key]
    return found


def workloads(obj, source: str, context: dict, budget: float | None,
              page_wins: bool = False) -> list[Workload]:
    """Every model described by ``obj`` (recursively), with inherited context (which
    overrides the object's own fields where ``page_wins``)."""
    f = fields_of(obj)
    if f is None:
        if isinstance(obj, (list, tuple)):
            return [w for x in obj for w in workloads(x, source, context, budget)]
        return []
    own = {**scalars(f), **context} if page_wins else {**context, **scalars(f)}
    found = []
    if "n_enc_layers" in f:  # an encoder-decoder: checked as a GPT of both depths
        own["n_layer"] = f["n_enc_layers"] + f.get("n_dec_layers", 0)
    if "n_layer" in own and any(k in f for k in ROLES["n_embd"]):
        vocab = own.get("vocab", 1)
        steps = own.get("steps", 0)
        opts = {**context.get("flags", {}), **flags(f)}
        precision = opts.get("precision")
        found.append(Workload(
            source, own["n_layer"], own["n_embd"], own.get("n_head", 1),
            vocab if vocab > 1 else PLACEHOLDER_VOCAB, own.get("context", 256),
            own.get("batch", 64) if steps else 1, steps, budget,
            precision if isinstance(precision, str) else None,
            opts.get("use_sdpa", True) is not False, bool(opts.get("compile")),
            int(opts.get("eval_interval") or 0), int(opts.get("eval_steps") or 0)))
    for value in f.values():
        if fields_of(value) is not None or isinstance(value, (list, tuple)):
            inner = {**own, "flags": {**context.get("flags", {}), **flags(f)}}
            found += workloads(value, source, inner, budget)  # each a model
    return found


class FitOptions(dict):
    """The options of a ``rt.fit({GiB: preset})`` call, found in a notebook."""


class Imported:
    """A preset a page imports and picks (``rt.pick(PRESETS["name"])``): the page's
    own ``*STEPS*`` and ``*BATCH*`` presets override its step count and batch."""

    def __init__(self, value):
        self.value = value


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
            elif name == "pick" and call.args and isinstance(
                    call.args[0], (ast.Name, ast.Subscript)):
                # rt.pick(PRESETS["name"]) of an imported preset: the Tiered itself,
                # whose size the page may change with its own *STEPS* / *BATCH*
                node.value = ast.Call(ast.Name("Imported", ast.Load()),
                                      [call.args[0]], [])
                keep.append(node)
                continue
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
    ns["FitOptions"], ns["Imported"] = FitOptions, Imported
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
    seen: set[int] = set()  # one object under two names is one workload
    for name in dict.fromkeys(names):
        obj = ns.get(name)
        where = f"{source}:{name}"
        inner = obj.value if isinstance(obj, Imported) else obj
        if id(inner) in seen:
            continue
        seen.add(id(inner))
        if isinstance(obj, Tiered):
            found += workloads(obj.gpu, where, context, None)
        elif isinstance(obj, Imported) and isinstance(obj.value, Tiered):
            found += workloads(obj.value.gpu, where, context, None, page_wins=True)
        elif isinstance(obj, FitOptions):
            for gib, preset in obj.items():
                found += workloads(preset, f"{where}[{gib}]", context, float(gib))
        elif isinstance(obj, dict) and all(isinstance(v, Tiered) for v in obj.values()):
            for key, tiered in obj.items():
                found += workloads(tiered.gpu, f"{where}[{key}]", context, None)
    return found


def notebook_workloads(path: Path, root: Path) -> tuple[list[Workload], list]:
    """(workloads, statements that failed) of the notebook at ``path``."""
    import jupytext

    cells = [c.source for c in jupytext.read(path).cells if c.cell_type == "code"]
    return notebook_presets(cells, str(path.relative_to(root)))


def module_presets(names: list[str]) -> list[Workload]:
    """Workloads of the gpu presets defined at module level in ``names`` (modules,
    or packages walked whole)."""
    found: list[Workload] = []
    for top in names:
        module = importlib.import_module(top)
        infos = ([top] if not hasattr(module, "__path__") else
                 [i.name for i in pkgutil.walk_packages(module.__path__, top + ".")])
        for name in infos:
            if name.split(".")[-1].startswith("_"):
                continue
            mod = importlib.import_module(name)  # none of them touches a GPU
            found += collect(vars(mod), [n for n in vars(mod) if not n.startswith("_")],
                             name)
    unique: dict = {}
    for w in found:
        unique.setdefault(dataclasses.replace(w, source=""), w)
    return list(unique.values())


def library_presets() -> list[Workload]:
    """The gpu presets of ``llmcore`` itself (the command line's)."""
    return module_presets([llmcore.__name__])
