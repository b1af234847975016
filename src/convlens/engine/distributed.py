"""Multi-process training with torchrun and DistributedDataParallel (nanoGPT-style, plain).

``convlens train DIR --nproc N`` re-runs itself through torchrun as ``--standalone
--nproc-per-node N -m convlens train DIR ...`` (the same arguments minus ``--nproc``; torchrun's
own ``main`` runs in ``python -m convlens.engine.distributed`` only to turn its failure traceback
into one line). ``torchrun --nproc-per-node N -m convlens train DIR`` is the same thing, and
torchrun's ``--nnodes/--node-rank/--rdzv-endpoint`` add machines. Inside each process:

* rank, local rank and world size come from torchrun's environment (``RANK``, ``LOCAL_RANK``,
  ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``); without them everything here is a no-op (one process);
* ``init_process_group`` with gloo on the CPU and nccl on CUDA (one GPU per local rank), with a
  timeout (``CONVLENS_DDP_TIMEOUT`` seconds, default 1800) so a stuck collective fails instead
  of hanging; ``cleanup()`` destroys the group in ``finally``;
* the configured batch size is the GLOBAL one: each process takes ``batch_size / N`` samples
  (an error when it does not divide), and shards the same per-epoch permutation as
  ``DistributedSampler`` does (rank r takes every N-th index), so global batch k holds the same
  samples for any N and, without augmentation randomness or batch norm, N processes end with the
  weights of one process;
* losses, correct counts and sample counts are summed over ranks; only rank 0 writes files and
  prints. An error in any rank makes torchrun stop the others (it polls them every 0.1 s).
"""

from __future__ import annotations

import contextlib
import datetime
import io
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from convlens.config import flag_of
from convlens.errors import ConfigError
from convlens.runtime import configure_threads, share_of_cores

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import torch
    from rich.console import Console

    from convlens.runtime import DeviceInfo

DEFAULT_TIMEOUT_S = 1800.0  # PyTorch's own default for gloo: long enough for a slow evaluation
TORCHRUN_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE")
BACKEND_GRACE_S = 0.2  # for gloo's threads to free the last collectives' tensors before exit (see cleanup)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value.strip() else default
    except ValueError:
        raise ConfigError(f"environment variable {name} must be an integer (torchrun sets it). "
                          f"Received: {name}={value!r}") from None


def timeout_seconds() -> float:
    """Collective timeout: ``$CONVLENS_DDP_TIMEOUT`` seconds, default 1800."""
    value = os.environ.get("CONVLENS_DDP_TIMEOUT", "")
    try:
        seconds = float(value) if value.strip() else DEFAULT_TIMEOUT_S
    except ValueError:
        seconds = -1.0
    if seconds <= 0:
        raise ConfigError(f"CONVLENS_DDP_TIMEOUT must be a positive number of seconds. "
                          f"Received: CONVLENS_DDP_TIMEOUT={value!r}")
    return seconds


def under_torchrun() -> bool:
    """True inside a process started by torchrun (its rank variables are set)."""
    return all(os.environ.get(k) for k in TORCHRUN_ENV)


@dataclass(frozen=True)
class Dist:
    """This process's place in the job. ``Dist()`` is the single-process case."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1

    @property
    def enabled(self) -> bool:
        """More than one process."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes files and prints."""
        return self.rank == 0

    # ------------------------------------------------------------------ set-up
    def default_threads(self) -> int:
        """One intra-op thread per core, the node's cores split between its processes."""
        return share_of_cores(self.local_world_size)

    def finish_threads(self, threads: int = 0) -> int | None:
        """Give torch the threads for what rank 0 does alone after the last collective (the final
        evaluation, report and bundle) and return them: its machine's cores, since the machine's
        other ranks have finished (during training each had its share). None, changing nothing,
        for one process or a fixed ``threads`` (``--threads``)."""
        return configure_threads() if self.enabled and not threads else None  # None: usable_cores()

    def console(self, console: Console) -> Console:
        """``console`` on rank 0; a silent one elsewhere (only rank 0 prints)."""
        if self.is_main:
            return console
        from rich.console import Console

        return Console(file=io.StringIO(), quiet=True)

    def start(self, dev: DeviceInfo) -> DeviceInfo:
        """Join the process group (once) and return this rank's device.

        gloo on the CPU, nccl on CUDA with one GPU per local rank. A no-op for one process.
        """
        if not self.enabled:
            return dev
        import torch
        import torch.distributed as td

        if dev.type == "cuda":
            count = torch.cuda.device_count()
            if self.local_rank >= count:
                raise ConfigError(f"{self.local_world_size} processes on this machine need as many GPUs; "
                                  f"it has {count}. Lower --nproc. Received: nproc={self.local_world_size}")
            torch.cuda.set_device(self.local_rank)
            dev = replace(dev, device=f"cuda:{self.local_rank}")
            backend = "nccl"
        elif dev.type == "cpu":
            backend = "gloo"
        else:
            raise ConfigError(f"multi-process training runs on cpu or cuda devices. Received: device={dev.device!r}")
        if not td.is_initialized():
            td.init_process_group(backend=backend, rank=self.rank, world_size=self.world_size,
                                  timeout=datetime.timedelta(seconds=timeout_seconds()))
        return dev

    def per_process_batch(self, global_batch: int) -> int:
        """``global_batch / world_size``; a :class:`ConfigError` when it does not divide."""
        if global_batch % self.world_size:
            raise ConfigError(
                f"batch_size is the global batch and must be divisible by the number of processes "
                f"({self.world_size}); use e.g. --batch-size {max(1, global_batch // self.world_size) * self.world_size}. "
                f"Received: batch_size={global_batch}")
        return global_batch // self.world_size

    def wrap(self, model: torch.nn.Module, dev: DeviceInfo) -> torch.nn.Module:
        """``DistributedDataParallel(model)`` (gradients averaged in backward); ``model`` for one process.

        Keep using the unwrapped model for state dicts, evaluation and saving.
        """
        if not self.enabled:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.local_rank] if dev.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, output_device=ids[0] if ids else None)

    # ------------------------------------------------------------------ collectives
    def _device(self) -> str:
        import torch
        import torch.distributed as td

        return f"cuda:{torch.cuda.current_device()}" if td.get_backend() == "nccl" else "cpu"

    def sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sum of ``values`` over all ranks (float64; ints stay ints)."""
        if not self.enabled:
            return list(values)
        import torch
        import torch.distributed as td

        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self._device())
        td.all_reduce(t, op=td.ReduceOp.SUM)
        out = t.cpu().tolist()
        return [int(round(o)) if isinstance(v, int) and not isinstance(v, bool) else o for v, o in zip(values, out, strict=True)]

    def sum_values(self, values: dict[str, Any], keys: Sequence[str]) -> dict[str, Any]:
        """A copy of ``values`` with ``keys`` summed over all ranks."""
        totals = self.sum([values[k] for k in keys])
        return {**values, **dict(zip(keys, totals, strict=True))}

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (small plain objects: a path, a number)."""
        if not self.enabled:
            return obj
        import torch.distributed as td

        box = [obj if self.is_main else None]
        td.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` in rank order, on every rank (small plain objects: counts, hash lists)."""
        if not self.enabled:
            return [obj]
        import torch.distributed as td

        out: list[Any] = [None] * self.world_size
        td.all_gather_object(out, obj)
        return out

    def gather_rows(self, rows: np.ndarray, n: int) -> np.ndarray:
        """Every rank's float32 rows ``(n_r, C)``, its :meth:`share` of ``n`` rows (``C`` the same on
        all ranks), concatenated in rank order, on every rank: one collective over the process
        group (the shares' sizes follow from ``n``), so no folder need be shared between machines."""
        if not self.enabled:
            return rows
        import numpy as np
        import torch
        import torch.distributed as td

        counts = [len(range(n)[_part(r, n, self.world_size)]) for r in range(self.world_size)]
        box = torch.zeros(max(counts), rows.shape[1], dtype=torch.float32)  # all_gather needs equal shapes
        box[:len(rows)] = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32))
        box = box.to(self._device())
        parts = [torch.empty_like(box) for _ in range(self.world_size)]
        td.all_gather(parts, box)
        return np.concatenate([p[:n].cpu().numpy() for p, n in zip(parts, counts, strict=True)])

    def share(self, n: int) -> slice:
        """This rank's contiguous part of ``n`` items when every rank takes one (sizes differ by at most 1)."""
        return _part(self.rank, n, self.world_size)

    def sync_buffers(self, model: torch.nn.Module) -> None:
        """Copy rank 0's buffers (batch-norm running statistics) to every rank.

        DDP broadcasts them before each training forward, but the last step's update is local:
        evaluation must use exactly the statistics that rank 0 saves.
        """
        if not self.enabled:
            return
        import torch.distributed as td

        for buf in model.buffers():
            td.broadcast(buf.data, src=0)

    def barrier(self) -> None:
        """Wait for every rank (no-op for one process)."""
        if self.enabled:
            import torch.distributed as td

            td.barrier()

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Each machine's first process (local rank 0) runs the block first (e.g. builds the
        cache), then the others (cache hits). Machines work at once: each builds its own cache,
        or, sharing one folder, take turns under the cache's lock and the later ones find it built."""
        if self.local_rank != 0:
            self.barrier()
        yield
        if self.local_rank == 0:
            self.barrier()


def _part(rank: int, n: int, world_size: int) -> slice:
    """Rank ``rank``'s contiguous part of ``n`` items shared by ``world_size`` ranks (the one rule
    of :meth:`Dist.share` and :meth:`Dist.gather_rows`)."""
    return slice(rank * n // world_size, (rank + 1) * n // world_size)


def from_env() -> Dist:
    """The :class:`Dist` described by torchrun's environment (one process without it)."""
    if not under_torchrun():
        return Dist()
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    local_world = _env_int("LOCAL_WORLD_SIZE", world)
    if world < 1 or not 0 <= rank < world or not 0 <= local_rank < max(local_world, 1):
        raise ConfigError(f"inconsistent torchrun environment. Received: RANK={rank}, LOCAL_RANK={local_rank}, "
                          f"WORLD_SIZE={world}, LOCAL_WORLD_SIZE={local_world}")
    return Dist(rank, local_rank, world, local_world)


def cleanup() -> None:
    """Leave the process group if this process joined one (call in ``finally``).

    Every rank leaves together, after a barrier: the others wait there while rank 0 evaluates
    and writes alone (within the collective timeout). Then a pause (:data:`BACKEND_GRACE_S`):
    gloo's worker threads free the last collectives' tensors after those have returned, which
    takes the GIL, and one still doing so when the interpreter shuts down aborts the process
    ("terminate called without an active exception", a rank's SIGABRT at the end of a good run).
    While an exception is propagating, the group is left as it is: leaving it would break the
    other ranks' collectives at once, and torchrun, seeing them die, would stop this process
    before it printed its error. The process exits right after reporting, which closes the
    connections anyway. A rank whose collective (the barrier here included) failed because a
    peer went away waits (see :func:`_wait_for_the_failed_peer`) so that torchrun names the rank
    that failed first.
    """
    try:
        import torch.distributed as td
    except ImportError:  # pragma: no cover
        return
    if not (td.is_available() and td.is_initialized()):
        return
    error = sys.exc_info()[1]
    try:
        if error is None:
            td.barrier()
            td.destroy_process_group()
            time.sleep(BACKEND_GRACE_S)  # releases the GIL to gloo's worker threads
    except RuntimeError as e:  # rank 0 failed while this rank waited in the barrier
        error = e
        raise
    finally:
        if error is not None and lost_a_peer(error):
            _wait_for_the_failed_peer(td.get_rank())


# What gloo says when another rank's process ended while this one waited in a collective.
PEER_LOST_MARKERS = ("closed by peer", "reset by peer")
PEER_GRACE_S = 15.0  # long enough for the failed rank to print its error and exit on a busy machine


def lost_a_peer(error: BaseException) -> bool:
    """True when ``error`` is a collective failing because another rank's process ended."""
    return isinstance(error, RuntimeError) and any(m in str(error) for m in PEER_LOST_MARKERS)


def _wait_for_the_failed_peer(rank: int) -> None:
    """Give the rank that failed first time to exit, so that torchrun stops this one (SIGTERM).

    A rank that fails prints its error and then exits, which can take a second; the ranks
    waiting on it see the connection close during that exit and would otherwise fail at once
    with a transport error, be reported first, and have the real error cut short.
    """
    print(f"convlens train: process {rank} stopped: another process of the job ended during a "
          "collective operation; its error is above (or on its own machine's terminal)", file=sys.stderr,
          flush=True)
    time.sleep(PEER_GRACE_S)


def should_launch(nproc: int) -> bool:
    """``--nproc N`` with N > 1 outside torchrun: start N processes through torchrun."""
    return nproc > 1 and not under_torchrun()


def preflight(nproc: int, batch_size: int, device: str = "auto", precision: str = "auto") -> None:
    """Refuse before starting anything what every process would refuse after starting:
    an indivisible global batch, more CUDA processes than GPUs, an unsupported device."""
    from convlens.runtime import resolve_device

    Dist(world_size=nproc, local_world_size=nproc).per_process_batch(batch_size)
    dev = resolve_device(device, precision)
    if dev.type == "cuda":
        import torch

        if nproc > torch.cuda.device_count():
            raise ConfigError(f"{nproc} processes need {nproc} GPUs (one each); this machine has "
                              f"{torch.cuda.device_count()}. Lower --nproc. Received: nproc={nproc}")
    elif dev.type != "cpu":
        raise ConfigError(f"multi-process training runs on cpu or cuda devices. Received: device={dev.device!r}")


def cli_arguments(overrides: dict[str, Any], config_file: str | None = None,
                  resume: str | None = None) -> list[str]:
    """The ``convlens train`` arguments that reproduce ``overrides`` (without ``--nproc``)."""
    args: list[str] = []
    if overrides.get("data") is not None:
        args.append(str(overrides["data"]))
    if config_file:
        args += ["--config", str(config_file)]
    if resume:
        args += ["--resume", str(resume)]
    for key, value in overrides.items():
        if key in ("data", "nproc") or value is None:
            continue
        flag = flag_of(key)
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, (list, tuple)):
            args += [flag, *(str(v) for v in value)]
        else:
            args.append(f"{flag}={value}")  # `=`: a value like -1 is not taken for a flag
    return args


def torchrun_command(nproc: int, train_args: Sequence[str]) -> list[str]:
    """``python -m convlens.engine.distributed --standalone --nproc-per-node N -m convlens train ...``.

    That is torchrun (``python -m torch.distributed.run``) with the same arguments, run through
    :func:`run_torchrun` so that a failed worker ends in one line and its exit code rather
    than torchrun's traceback. ``--standalone`` runs the rendezvous on this machine on a free port.
    """
    return [sys.executable, "-m", "convlens.engine.distributed", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "convlens", "train", *train_args]


def run_torchrun(argv: Sequence[str]) -> int:
    """torchrun's ``main(argv)``, returning the first failed worker's exit code (1 if it was killed).

    Each worker prints its own error (a ``UserError`` as one line); this adds one line naming
    the rank that failed first instead of torchrun's ``ChildFailedError`` traceback.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(list(argv)))
    except SignalException as e:  # Ctrl-C / SIGTERM: torchrun has stopped the workers
        print(f"convlens train: interrupted ({e.sigval.name}); every process was stopped. Resume from the "
              "last epoch with: convlens train --resume RUN_FOLDER", file=sys.stderr)
        return 128 + int(e.sigval)
    except ChildFailedError as e:
        # A rank that exited with an error caused the stop; ranks killed by a signal at about
        # the same time (gloo aborts when a peer leaves mid-collective) only followed it.
        errors = {r: f for r, f in e.failures.items() if f.exitcode > 0}
        rank, failure = min(errors.items(), key=lambda rf: rf[1].timestamp) if errors else e.get_first_failure()
        code = failure.exitcode
        how = f"exit code {code}" if code >= 0 else f"signal {-code}"
        print(f"convlens train: error: process {rank} of the distributed job failed first ({how}); "
              "the others were stopped. See its message above", file=sys.stderr)
        return code if code > 0 else 1
    return 0


def launch(nproc: int, train_args: Sequence[str], env: dict[str, str] | None = None) -> int:
    """Run ``convlens train`` in ``nproc`` processes through torchrun; return its exit code.

    While it runs, SIGINT/SIGTERM sent to this process only are passed on to torchrun (a
    terminal's Ctrl-C reaches every process anyway), which stops its workers; torchrun is never
    killed outright, since that would orphan them.
    """
    full_env = dict(os.environ if env is None else env)
    # torchrun would set 1 thread per process and print a warning; split the cores instead.
    full_env.setdefault("OMP_NUM_THREADS", str(share_of_cores(nproc)))
    proc = subprocess.Popen(torchrun_command(nproc, train_args), env=full_env)

    def forward(signum: int, frame: Any) -> None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signum)

    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():  # handlers only from the main thread
        previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


if __name__ == "__main__":  # the launcher's torchrun: python -m convlens.engine.distributed ...
    raise SystemExit(run_torchrun(sys.argv[1:]))
