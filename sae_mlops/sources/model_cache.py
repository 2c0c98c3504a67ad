"""An LRU cache of loaded base models, for long-lived processes (the service's Ray actors).

`load_model` consults the process-wide cache set with `set_model_cache` (none by default: the CLI
and the service's job processes load a model per analysis, as before). The key is
(name, dtype, resolved device, from_pretrained kwargs as sorted JSON); a local checkpoint directory
is keyed by its resolved path and the modification time of its ``config.json``, so a checkpoint
rewritten in place is loaded again.

Sharing is safe because the analysis does not mutate the model: the engine runs it under
``torch.no_grad`` with temporary hooks (``run_with_cache`` / ``run_with_hooks`` remove them), the
hook_z reshaping flag it turns off lives on the SAE, and tokenizers are only read. As a guard, a
model taken from the cache has its (non-permanent) hooks reset and is put in eval mode.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Hashable

log = logging.getLogger(__name__)

Key = tuple[str, str, str, str]


class ModelCache:
    """At most `size` loaded models, least recently used evicted first (`size` 0: no caching)."""

    def __init__(self, size: int) -> None:
        if size < 0:
            raise ValueError(f"model cache size {size} must not be negative")
        self.size = int(size)
        self._items: OrderedDict[Hashable, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    @staticmethod
    def key(name: str, dtype: str, device: str, from_pretrained_kwargs: dict[str, Any] | None) -> Key:
        """The cache key: name (a local path resolved, with its config.json mtime), dtype, device and kwargs."""
        ident = name
        path = Path(name).expanduser()
        if name != "demo" and path.exists():
            config = path / "config.json"
            mtime = config.stat().st_mtime_ns if config.is_file() else 0
            ident = f"{path.resolve()}@{mtime}"
        kwargs = json.dumps(from_pretrained_kwargs or {}, sort_keys=True, default=str)
        return (ident, str(dtype).removeprefix("torch."), str(device), kwargs)

    def get(self, key: Hashable, loader: Callable[[], Any]) -> Any:
        """The cached value for `key`, else `loader()` (stored, evicting the least recently used)."""
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                self.hits += 1
                value = self._items[key]
                _sanitise(value)
                log.debug("model cache hit: %s", key)
                return value
            self.misses += 1
        value = loader()  # outside the lock: a load may take minutes
        if self.size == 0:
            return value
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                old, _ = self._items.popitem(last=False)
                self.evictions += 1
                log.info("model cache: evicted %s (size %d)", old, self.size)
        return value

    def keys(self) -> list[Hashable]:
        """Keys from least to most recently used."""
        with self._lock:
            return list(self._items)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"size": self.size, "loaded": len(self._items), "hits": self.hits, "misses": self.misses,
                    "evictions": self.evictions, "keys": [list(k) if isinstance(k, tuple) else k for k in self._items]}


def _sanitise(loaded: Any) -> None:
    model = getattr(loaded, "model", None)
    if model is None:
        return
    reset = getattr(model, "reset_hooks", None)
    if callable(reset):
        reset(including_permanent=False)
    eval_ = getattr(model, "eval", None)
    if callable(eval_):
        eval_()


_ACTIVE: ModelCache | None = None


def set_model_cache(cache: ModelCache | None) -> ModelCache | None:
    """Make `cache` the process-wide model cache used by `load_model` (None: off); returns the previous one."""
    global _ACTIVE
    previous, _ACTIVE = _ACTIVE, cache
    return previous


def active_model_cache() -> ModelCache | None:
    return _ACTIVE
