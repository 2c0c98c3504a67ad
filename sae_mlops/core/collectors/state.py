"""Collector state declared once, in the torchmetrics ``add_state`` manner.

A collector derives from :class:`StateCollector` and declares, in ``__init__``, every attribute that
makes up its result: ``self.add_state(name, default, reduce)``. From those declarations alone the
base class gives

- ``reset()``: every state back to (a copy of) its default;
- ``state_dict()`` / ``load_state_dict(d)``: the states as CPU tensors and back, checked against
  the declarations (a missing or extra key, a dtype or a shape that differs raises ``ValueError``);
- ``merge(other)``: another collector of the same class and configuration (a shard of the corpus)
  folded in per declared reduce;
- :func:`save_states` / :func:`load_states`: many collectors in one safetensors file plus a JSON
  sidecar (no pickle), each written atomically.

Reduces (``a`` this collector's value, ``b`` the other's):

- ``"sum"``: ``a + b`` (integer sums exact; a float sum depends on the order of merges, so shards
  are merged in shard order);
- ``"max"`` / ``"min"``: elementwise ``max(a, b)`` / ``min(a, b)``;
- ``"cat"``: ``concat([a, b])`` along dim 0 (order matters);
- :class:`TopK`: a group of states with the leading shape ``[d, k]`` (the examples' value, token,
  document, position and context ``[d, k, w]``) merged jointly: the ``2k`` slots of each row are
  ordered by the ``key`` state descending, ties by the ``tie`` state ascending, slots still equal to
  their defaults (unfilled) last; the first ``k`` are kept and every state of the group is gathered
  in that order.

Defaults are torch tensors (any dtype and shape), numpy arrays (kept as numpy attributes, e.g. the
co-occurrence counts that SciPy adds into) or Python ``int``/``float`` (kept as Python scalars,
exported as 0-d int64/float64 tensors). Buffers that are not state (pending sparse products,
device-side counts) are folded into the declared state by ``sync()``, which runs before any export
and before a merge.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sae_mlops.files import atomic_write, atomic_write_text

REDUCES = ("sum", "max", "min", "cat")
FORMAT = "sae_mlops.collector_states"
VERSION = 1


@dataclass(frozen=True)
class TopK:
    """A top-k group: the states declared with an equal ``TopK`` are merged jointly.

    ``key``: the state ordered descending (e.g. the activation value); ``tie``: the state that
    breaks ties ascending (e.g. the global token index); both are members of the group."""

    key: str
    tie: str | None = None

    def describe(self) -> str:
        return f"topk(key={self.key}, tie={self.tie})"


Reduce = str | TopK
Value = torch.Tensor | np.ndarray | int | float


@dataclass
class _Decl:
    """A declared state. A constant default (all elements equal, e.g. zeros or -inf) is kept as
    its fill value only, so that a 1 GiB count matrix is not held twice."""

    reduce: Reduce
    kind: str  # "tensor" | "ndarray" | "int" | "float"
    dtype: torch.dtype
    shape: tuple[int, ...]
    fill: Any = None  # the default's value everywhere, when constant
    value: torch.Tensor | np.ndarray | None = None  # a copy of the default, when not constant

    @classmethod
    def of(cls, default: Value, reduce: Reduce, kind: str) -> _Decl:
        if kind == "int":
            return cls(reduce, kind, torch.int64, (), fill=default)
        if kind == "float":
            return cls(reduce, kind, torch.float64, (), fill=default)
        t = torch.from_numpy(default) if isinstance(default, np.ndarray) else default
        assert isinstance(t, torch.Tensor)
        decl = cls(reduce, kind, t.dtype, tuple(t.shape))
        fill = _constant(t)
        if fill is None:
            decl.value = _copy(default)  # type: ignore[assignment]
        else:
            decl.fill = fill
        return decl

    def fresh(self) -> Value:
        """A new copy of the default."""
        if self.kind in ("int", "float"):
            return self.fill
        if self.value is not None:
            return _copy(self.value)
        if self.kind == "ndarray":
            np_dtype = torch.empty(0, dtype=self.dtype).numpy().dtype
            # np.zeros maps untouched pages lazily (no memory until written)
            return np.zeros(self.shape, np_dtype) if self.fill == 0 else np.full(self.shape, self.fill, np_dtype)
        return torch.full(self.shape, self.fill, dtype=self.dtype)

    def is_default(self, t: torch.Tensor, repeat: int = 1) -> torch.Tensor:
        """Elementwise ``t == default`` for ``t`` of the default's shape repeated ``repeat`` times
        along dim 1 (the joined top-k slots)."""
        if self.value is None:
            return t == self.fill
        d = self.value if isinstance(self.value, torch.Tensor) else torch.from_numpy(self.value)
        return t == torch.cat([d] * repeat, dim=1)


def _constant(t: torch.Tensor) -> Any:
    """The value of every element of ``t`` when they are all equal (and ``t`` is not empty), else None."""
    if t.numel() == 0:
        return None
    try:
        lo, hi = t.min(), t.max()
    except RuntimeError:  # dtypes without min/max
        return None
    if bool(lo == hi):
        return lo.item()
    return None


def _copy(value: Value) -> Value:
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, np.ndarray):
        return value.copy()
    return value


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class StateCollector:
    """Base class of the collectors: state declared with :meth:`add_state`, exported, loaded and
    merged generically. Subclasses set ``name`` (unique among the collectors of one analysis),
    call ``super().__init__()`` first, and report the constructor arguments that shape or give
    meaning to their state in :meth:`state_config`."""

    name: str = ""

    def __init__(self) -> None:
        self._decls: dict[str, _Decl] = self.__dict__.get("_decls", {})

    # -- declaration ----------------------------------------------------------------------------
    def add_state(self, name: str, default: Value, reduce: Reduce) -> None:
        """Declare the state ``name``: sets ``self.<name>`` to a copy of ``default`` and records how
        it merges (``"sum"``, ``"max"``, ``"min"``, ``"cat"`` or a :class:`TopK` group)."""
        decls = self.__dict__.setdefault("_decls", {})
        where = f"{type(self).__name__}.add_state({name!r})"
        if not name.isidentifier():
            raise ValueError(f"{where}: a state name must be a Python identifier.")
        if name in decls:
            raise ValueError(f"{where}: the state is already declared.")
        if isinstance(default, bool):
            raise ValueError(f"{where}: a bool default is ambiguous; use an int or a tensor.")
        if isinstance(default, torch.Tensor):
            kind = "tensor"
        elif isinstance(default, np.ndarray):
            kind = "ndarray"
        elif isinstance(default, int):
            kind = "int"
        elif isinstance(default, float):
            kind = "float"
        else:
            raise ValueError(f"{where}: the default must be a tensor, a numpy array, an int or a float, not {type(default).__name__}.")
        if isinstance(reduce, TopK):
            if kind not in ("tensor",) or default.dim() < 2:  # type: ignore[union-attr]
                raise ValueError(f"{where}: a TopK state must be a tensor of shape [d, k, ...].")
        elif reduce not in REDUCES:
            raise ValueError(f"{where}: unknown reduce {reduce!r}; use one of {REDUCES} or a TopK group.")
        elif reduce == "cat" and kind in ("int", "float"):
            raise ValueError(f"{where}: a Python scalar cannot be concatenated; use a tensor.")
        decl = _Decl.of(default, reduce, kind)
        decls[name] = decl
        setattr(self, name, decl.fresh())

    @property
    def state_names(self) -> list[str]:
        """The declared states, in declaration order."""
        return list(self.__dict__.get("_decls", {}))

    def state_config(self) -> dict[str, Any]:
        """The constructor arguments that matter to the state (JSON values); two collectors merge
        or load each other's state only when their configs are equal."""
        return {}

    def reset(self) -> None:
        """Every declared state back to its default; buffers are the subclass's business."""
        for name, decl in self._decls.items():
            setattr(self, name, decl.fresh())

    def sync(self) -> None:
        """Fold buffered work (pending products, device-side counts) into the declared state.
        Runs before every export and before a merge; a no-op unless a collector buffers."""

    # -- export / import ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """After :meth:`sync`, every declared state as a CPU tensor (Python scalars as 0-d int64 /
        float64). Tensors may share memory with the collector: clone before changing them."""
        self.sync()
        out: dict[str, torch.Tensor] = {}
        for name, decl in self._decls.items():
            value = getattr(self, name)
            if decl.kind == "int":
                out[name] = torch.tensor(int(value), dtype=torch.int64)
            elif decl.kind == "float":
                out[name] = torch.tensor(float(value), dtype=torch.float64)
            elif decl.kind == "ndarray":
                out[name] = torch.from_numpy(np.ascontiguousarray(value))
            else:
                out[name] = value.detach().cpu().contiguous()
        return out

    def state_spec(self) -> dict[str, Any]:
        """The JSON description of this collector's state: class, config and per state its dtype,
        shape, reduce and kind (tensor, ndarray, int or float)."""
        states = {}
        for name, decl in self._decls.items():
            value = getattr(self, name)
            shape = list(value.shape) if decl.kind in ("tensor", "ndarray") else []
            reduce = decl.reduce.describe() if isinstance(decl.reduce, TopK) else decl.reduce
            states[name] = {"dtype": _dtype_name(decl.dtype), "shape": shape, "reduce": reduce, "kind": decl.kind}
        return {"name": self.name, "class": type(self).__name__, "config": self.state_config(), "states": states}

    def load_state_dict(self, d: Mapping[str, torch.Tensor], copy: bool = True) -> None:
        """Replace the declared states by ``d`` (the inverse of :meth:`state_dict`; Python scalars
        come back as Python int/float). Everything is checked before anything is replaced.
        ``copy=False`` adopts the given tensors (for tensors nobody else holds, e.g. just read)."""
        self.check_state_dict(d)
        for name, decl in self._decls.items():
            t = d[name]
            if decl.kind == "int":
                setattr(self, name, int(t))
            elif decl.kind == "float":
                setattr(self, name, float(t))
            else:
                t = t.detach().cpu()
                if copy:
                    t = t.clone()
                setattr(self, name, t.numpy() if decl.kind == "ndarray" else t)

    def check_state_dict(self, d: Mapping[str, torch.Tensor]) -> None:
        """Raise ``ValueError`` (one sentence naming the collector, the state and what differs)
        unless ``d`` holds exactly the declared states with their dtypes and shapes."""
        who = f"collector {self.name!r} ({type(self).__name__})"
        missing = [n for n in self._decls if n not in d]
        if missing:
            raise ValueError(f"{who}: the state dict has no state {', '.join(map(repr, missing))}.")
        extra = [n for n in d if n not in self._decls]
        if extra:
            raise ValueError(f"{who}: the state dict has state {', '.join(map(repr, extra))} that this collector does not declare.")
        for name, decl in self._decls.items():
            t = d[name]
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"{who}, state {name!r}: expected a tensor, got {type(t).__name__}.")
            want = decl.dtype
            if t.dtype != want:
                raise ValueError(f"{who}, state {name!r}: dtype {_dtype_name(t.dtype)} differs from the declared {_dtype_name(want)}.")
            current = getattr(self, name)
            shape = tuple(current.shape) if decl.kind in ("tensor", "ndarray") else ()
            got = tuple(t.shape)
            ok = got[1:] == shape[1:] and len(got) == len(shape) if decl.reduce == "cat" else got == shape
            if not ok:
                raise ValueError(f"{who}, state {name!r}: shape {list(got)} differs from the expected {list(shape)}"
                                 + (" (any length along dim 0)." if decl.reduce == "cat" else "."))

    # -- merge ----------------------------------------------------------------------------------
    def _check_compatible(self, other: StateCollector) -> None:
        who = f"collector {self.name!r} ({type(self).__name__})"
        if type(other) is not type(self):
            raise ValueError(f"{who}: cannot merge a {type(other).__name__}.")
        mine, theirs = self.state_config(), other.state_config()
        if mine != theirs:
            diff = {k: (mine.get(k), theirs.get(k)) for k in sorted(set(mine) | set(theirs)) if mine.get(k) != theirs.get(k)}
            raise ValueError(f"{who}: cannot merge a collector of another configuration ({diff}, mine vs other).")

    def merge(self, other: StateCollector) -> None:
        """Fold ``other`` (same class and config; a later shard for the order-dependent reduces)
        into this collector, per declared reduce. Both are synced first; ``other`` is unchanged."""
        self._check_compatible(other)
        self.sync()
        other.sync()
        groups: dict[TopK, list[str]] = {}
        for name, decl in self._decls.items():  # check everything before changing anything
            if isinstance(decl.reduce, TopK):
                groups.setdefault(decl.reduce, []).append(name)
                continue
            a, b = getattr(self, name), getattr(other, name)
            if decl.kind in ("tensor", "ndarray") and (a.shape[1:] != b.shape[1:] if decl.reduce == "cat" else a.shape != b.shape):
                raise ValueError(f"collector {self.name!r}, state {name!r}: shapes {list(a.shape)} and {list(b.shape)} differ.")
        for group, names in groups.items():
            self._check_topk(other, group, names)
        for name, decl in self._decls.items():
            if isinstance(decl.reduce, TopK):
                continue
            a, b = getattr(self, name), getattr(other, name)
            if decl.kind in ("int", "float"):
                setattr(self, name, a + b if decl.reduce == "sum" else (max(a, b) if decl.reduce == "max" else min(a, b)))
            elif decl.reduce == "sum":
                a += b
            elif decl.reduce == "cat":
                setattr(self, name, torch.cat([a, b]) if decl.kind == "tensor" else np.concatenate([a, b]))
            elif decl.kind == "tensor":
                (torch.maximum if decl.reduce == "max" else torch.minimum)(a, b, out=a)
            else:
                (np.maximum if decl.reduce == "max" else np.minimum)(a, b, out=a)
        for group, names in groups.items():
            self._merge_topk(other, group, names)

    def _check_topk(self, other: StateCollector, group: TopK, names: list[str]) -> None:
        who = f"collector {self.name!r}, top-k group {group.describe()}"
        for needed in (group.key, group.tie):
            if needed is not None and needed not in names:
                raise ValueError(f"{who}: {needed!r} is not a state of the group.")
        lead = tuple(getattr(self, group.key).shape[:2])
        for name in names:
            a, b = getattr(self, name), getattr(other, name)
            if tuple(a.shape[:2]) != lead or a.shape != b.shape:
                raise ValueError(f"{who}: state {name!r} has shape {list(a.shape)} here and {list(b.shape)} in the other; "
                                 f"every state of the group must be [{lead[0]}, {lead[1]}, ...] in both.")

    def _merge_topk(self, other: StateCollector, group: TopK, names: list[str]) -> None:
        """The joint top-k of this collector's and ``other``'s slots (see the module docstring)."""
        d, k = getattr(self, group.key).shape[:2]
        joined = {n: torch.cat([getattr(self, n), getattr(other, n)], dim=1) for n in names}
        # unfilled: key and tie still at their defaults
        empty = self._decls[group.key].is_default(joined[group.key], repeat=2)
        if group.tie is not None:
            empty &= self._decls[group.tie].is_default(joined[group.tie], repeat=2)
        while empty.dim() > 2:
            empty = empty.all(dim=-1)
        # lexicographic (filled first, key desc, tie asc) by stable sorts from the last criterion
        order = torch.arange(2 * k).expand(d, 2 * k)
        if group.tie is not None:
            order = torch.argsort(joined[group.tie], dim=1, stable=True)
        key = joined[group.key].gather(1, order)
        order = order.gather(1, torch.argsort(key, dim=1, descending=True, stable=True))
        order = order.gather(1, torch.argsort(empty.gather(1, order).to(torch.int8), dim=1, stable=True))
        best = order[:, :k]
        for name in names:
            src = joined[name]
            index = best.reshape(d, k, *([1] * (src.dim() - 2))).expand(d, k, *src.shape[2:])
            getattr(self, name).copy_(src.gather(1, index))


# -- files ---------------------------------------------------------------------------------------
def state_paths(path: Path) -> tuple[Path, Path]:
    """(``<path>.safetensors``, ``<path>.json``) for the states saved under ``path``."""
    path = Path(path)
    return path.with_name(path.name + ".safetensors"), path.with_name(path.name + ".json")


def _spec(collectors: Sequence[StateCollector]) -> dict[str, Any]:
    names = [c.name for c in collectors]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"collector names must be unique to save or load their states; repeated: {dupes}.")
    return {"format": FORMAT, "version": VERSION, "collectors": [c.state_spec() for c in collectors]}


def save_states(collectors: Sequence[StateCollector], path: Path) -> list[Path]:
    """Write every collector's :meth:`~StateCollector.state_dict` into ONE safetensors file
    ``<path>.safetensors`` (keys ``<collector name>/<state>``) and the description of the states
    (:meth:`~StateCollector.state_spec` per collector) into ``<path>.json``; the safetensors header
    carries the same description, so a pair from different saves is detected on load. Each file is
    written to a temporary name and renamed (atomic); the safetensors file first, so a save is
    complete once this returns (record it in a manifest then). No pickle. Returns the two paths.

    Files are never rewritten in place: :func:`load_states` adopts tensors that may be mapped from
    the file, which stays valid when a later save replaces (renames over) it."""
    tensor_path, json_path = state_paths(path)
    tensors: dict[str, torch.Tensor] = {}
    for c in collectors:
        for name, t in c.state_dict().items():
            tensors[f"{c.name}/{name}"] = t
    spec = _spec(collectors)  # after the syncs: shapes of cat states are final
    text = json.dumps(spec, indent=1, sort_keys=True)
    atomic_write(tensor_path, lambda p: save_file(tensors, str(p), metadata={FORMAT: text}))
    atomic_write_text(json_path, text + "\n")
    return [tensor_path, json_path]


def _describe_difference(want: dict[str, Any], got: dict[str, Any]) -> str:
    w_names = [c["name"] for c in want["collectors"]]
    g_names = [c["name"] for c in got["collectors"]]
    if w_names != g_names:
        return f"the collectors differ: {g_names} saved, {w_names} given"
    for w, g in zip(want["collectors"], got["collectors"], strict=True):
        if w["class"] != g["class"]:
            return f"collector {w['name']!r} is a {g['class']} in the file and a {w['class']} here"
        if w["config"] != g["config"]:
            keys = sorted(set(w["config"]) | set(g["config"]))
            diff = {k: (g["config"].get(k), w["config"].get(k)) for k in keys if w["config"].get(k) != g["config"].get(k)}
            return f"collector {w['name']!r} has another configuration (saved vs given: {diff})"
        if sorted(w["states"]) != sorted(g["states"]):
            return f"collector {w['name']!r} declares states {sorted(w['states'])}, the file holds {sorted(g['states'])}"
        for s, ws in w["states"].items():
            gs = g["states"][s]
            for field in ("dtype", "reduce", "kind"):
                if ws[field] != gs[field]:
                    return f"collector {w['name']!r}, state {s!r}: {field} {gs[field]} saved, {ws[field]} declared"
    return ""


def load_states(collectors: Sequence[StateCollector], path: Path) -> None:
    """Load what :func:`save_states` wrote at ``path`` into ``collectors`` (freshly constructed
    with the same config, in the same order). A different collector list, class, config (d_sae,
    k, ...) or state declaration, or a JSON sidecar from another save, raises ``ValueError``
    naming the difference; nothing is loaded then."""
    tensor_path, json_path = state_paths(path)
    for p in (tensor_path, json_path):
        if not p.is_file():
            raise ValueError(f"no collector states at {p}.")
    try:
        saved = json.loads(json_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{json_path} is not valid JSON ({err}).") from err
    if not isinstance(saved, dict) or saved.get("format") != FORMAT or saved.get("version") != VERSION:
        raise ValueError(f"{json_path} is not a collector-state file of version {VERSION} (format {FORMAT!r}).")
    with safe_open(str(tensor_path), framework="pt") as fh:
        header = (fh.metadata() or {}).get(FORMAT)
    if header is None or json.loads(header) != saved:
        raise ValueError(f"{tensor_path} and {json_path} are not from the same save.")
    want = _spec(collectors)
    diff = _describe_difference(want, saved)
    if diff:
        raise ValueError(f"the states at {tensor_path} do not fit: {diff}.")
    tensors = load_file(str(tensor_path))
    parts: dict[str, dict[str, torch.Tensor]] = {c.name: {} for c in collectors}
    for key, t in tensors.items():
        cname, _, sname = key.partition("/")
        if cname not in parts:
            raise ValueError(f"{tensor_path} holds {key!r}, of no given collector.")
        parts[cname][sname] = t
    for c in collectors:  # check every collector before loading any
        c.check_state_dict(parts[c.name])
    for c in collectors:
        c.load_state_dict(parts[c.name], copy=False)


def merge_saved_states(collectors: Sequence[StateCollector], paths: Sequence[Path],
                       fresh: Callable[[], Sequence[StateCollector]]) -> None:
    """Merge the states saved at ``paths`` into ``collectors``, in the order given (shard order),
    one file at a time: each is loaded into ``fresh()`` (new collectors of the same config) and
    merged, so memory holds the target and one shard."""
    for path in paths:
        shard = fresh()
        load_states(shard, path)
        if len(shard) != len(collectors):
            raise ValueError(f"fresh() gave {len(shard)} collectors for {len(collectors)} targets.")
        for target, part in zip(collectors, shard, strict=True):
            target.merge(part)
