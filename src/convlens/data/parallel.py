"""Run a per-file function on all cores with a progress bar (decoding is CPU-bound and the GIL
would serialise threads), or in-process for small inputs where starting processes costs more
than it saves."""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import nullcontext
from typing import Any, TypeVar

from convlens.errors import ConfigError
from convlens.runtime import usable_cores

T = TypeVar("T")
R = TypeVar("R")

# Below this many items a process pool is slower than one loop (start-up ~0.3 s).
MIN_PARALLEL = 48


def resolve_workers(workers: int) -> int:
    """``0`` means all cores (or ``$CONVLENS_WORKERS`` when set); negative is an error."""
    if workers < 0:
        raise ConfigError(f"workers must be 0 (all cores) or a positive number. Received: workers={workers}")
    if workers == 0:
        env = os.environ.get("CONVLENS_WORKERS", "")
        workers = int(env) if env.isdigit() and int(env) > 0 else usable_cores()
    return workers


def _context() -> Any:
    # On Linux fork, as torch's DataLoader does: workers start instantly and a user's script
    # without an ``if __name__ == "__main__"`` guard is not re-executed (forkserver/spawn would
    # re-import it and fail). Workers only run Pillow/NumPy, never torch or OpenMP code, so
    # the parent's threads do not matter. macOS/Windows: spawn (fork is unsafe there).
    if sys.platform.startswith("linux"):
        return mp.get_context("fork")
    return mp.get_context("spawn")


def progress_bar(enabled: bool) -> Any:
    """A rich progress bar on stderr, or a null context when disabled."""
    if not enabled:
        return nullcontext(None)
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeRemainingColumn,
    )

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TaskProgressColumn(), TimeRemainingColumn(),
                    console=Console(stderr=True), transient=False)


def pmap(fn: Callable[[T], R], items: Sequence[T] | Iterable[T], *, workers: int = 0,
         progress: bool = False, description: str = "working", total: int | None = None,
         min_parallel: int = MIN_PARALLEL) -> Iterator[R]:
    """Yield ``fn(item)`` for every item, in completion order (results must carry their own key).

    ``fn`` must be a module-level function (or a ``functools.partial`` of one) so that worker
    processes can import it.
    """
    items = list(items)
    n = len(items) if total is None else total
    workers = min(resolve_workers(workers), max(1, len(items)))
    with progress_bar(progress and n > 0) as bar:
        task = bar.add_task(description, total=n) if bar is not None else None
        if workers <= 1 or len(items) < min_parallel:
            for item in items:
                yield fn(item)
                if bar is not None:
                    bar.advance(task)
            return
        # Small chunks keep the bar moving and the load balanced; large ones cut IPC overhead.
        chunksize = max(1, min(32, len(items) // (workers * 8)))
        with warnings.catch_warnings():
            # Python 3.12+ warns about fork in a threaded parent; see _context() for why it is safe.
            warnings.filterwarnings("ignore", message=".*fork.*", category=DeprecationWarning)
            pool = _context().Pool(workers)
        with pool:
            for result in pool.imap_unordered(fn, items, chunksize=chunksize):
                yield result
                if bar is not None:
                    bar.advance(task)
