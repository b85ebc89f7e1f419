"""jax's persistent compilation cache, so a restarted process (server, CLI, benchmark) does not compile
its steps again: the compiled executables (and on GPU the per-fusion autotuning results) are written
under one directory and read back by the next process that compiles the same programs.

    from ftjax import compile_cache
    compile_cache.enable("/var/cache/ftjax")      # before the first jit compiles

`enable()` with no argument uses $FTJAX_COMPILE_CACHE, else ~/.cache/ftjax/jax.
"""
from __future__ import annotations

import os

ENV = "FTJAX_COMPILE_CACHE"
_enabled: str | None = None


def default_dir() -> str:
    return os.environ.get(ENV) or os.path.join(os.path.expanduser("~"), ".cache", "ftjax", "jax")


def enable(path: str | None = None, *, min_compile_time_s: float = 0.0) -> str:
    """Turns the persistent cache on at `path` (created). Every program whose compile took at least
    `min_compile_time_s` is cached (0: all of them — a decode step is worth caching even when it compiles
    fast). Idempotent; returns the directory in use."""
    global _enabled
    import jax

    path = os.path.abspath(os.path.expanduser(path or default_dir()))
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_time_s))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    _enabled = path
    return path


def enabled_dir() -> str | None:
    """The directory `enable` set in this process (None if it was not called)."""
    return _enabled


def entries(path: str | None = None) -> int:
    """Files in the cache directory (a rough count of cached programs)."""
    path = path or _enabled or default_dir()
    if not os.path.isdir(path):
        return 0
    return sum(len(fs) for _, _, fs in os.walk(path))
