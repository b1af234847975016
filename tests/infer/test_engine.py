"""The inference engine: auto runs an fp32 CPU bundle through onnxruntime (a verified export,
cached by content), with the same predictions, novelty and maps as torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import convlens
import convlens.export.onnx as export_onnx_module
from convlens.cli import main
from convlens.errors import ConfigError
from convlens.infer import TorchBackend
from convlens.infer import engine as eng
from convlens.infer.bundle import read_meta, save_bundle
from tests.bundles import make_meta, make_model, write_images

Case = tuple[Path, dict[str, list[Path]]]


def fp32_bundle(path: Path, seed: int = 0) -> Path:
    """A bundle that predicts in fp32 (as training records for Lite backbones)."""
    model = make_model("tiny", 2, 3, seed, size=32, random_biases=True)
    meta = make_meta(model, ("cats", "dogs"))
    meta.precision = "fp32"
    return save_bundle(path, model, meta)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("engine_cache")


@pytest.fixture(autouse=True)
def _cache_dir(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVLENS_CACHE_DIR", str(cache))


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fp32_bundle(tmp_path_factory.mktemp("fp32") / "model.convlens")


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_images(tmp_path_factory.mktemp("imgs"), 6, size=(45, 37))


def onnx_files(cache: Path) -> list[Path]:
    return sorted((cache / "onnx").glob("*.onnx"))


def test_resolve_engine_rules(bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from convlens import runtime

    fp32 = read_meta(bundle)
    assert eng.resolve_engine("auto", fp32, "cpu") == "onnx"
    assert eng.resolve_engine("auto", fp32, "cpu", "bf16") == "torch"  # an explicit bf16 request wins
    assert eng.resolve_engine("torch", fp32, "cpu") == "torch"
    auto = make_meta(make_model("tiny", 2), ("cats", "dogs"))  # precision auto: the hardware decides
    monkeypatch.setattr(runtime, "cpu_supports_bf16", lambda: True)
    assert eng.resolve_engine("auto", auto, "cpu") == "torch"
    monkeypatch.setattr(runtime, "cpu_supports_bf16", lambda: False)
    assert eng.resolve_engine("auto", auto, "cpu") == "onnx"
    with pytest.raises(ConfigError, match="engine onnx runs in fp32"):
        eng.resolve_engine("onnx", fp32, "cpu", "bf16")
    with pytest.raises(ConfigError, match="engine onnx runs on the CPU"):
        eng.resolve_engine("onnx", fp32, "cuda")
    with pytest.raises(ConfigError, match=r"engine must be one of auto, torch, onnx. Received: engine='onx'"):
        eng.resolve_engine("onx", fp32, "cpu")


@pytest.mark.parametrize(("version", "cpu_only"), [("2.13.0+cpu", True), ("2.1.0+cpu.cxx11.abi", True),
                                                 ("2.13.0", False), ("2.4.0+cu121", False), ("2.4.0+rocm6.1", False)])
def test_a_cpu_only_torch_needs_no_import_to_pick_the_engine(bundle: Path, monkeypatch: pytest.MonkeyPatch,
                                                            version: str, cpu_only: bool) -> None:
    """``--device auto`` with PyTorch's CPU-only build: no GPU to look for, so the fp32 bundle goes to
    onnxruntime without asking torch (its import is most of a short predict); any other build asks."""
    from importlib import metadata

    from convlens import runtime

    monkeypatch.setattr(metadata, "version", lambda name: version)
    asked: list[str] = []
    monkeypatch.setattr(runtime, "inference_device", lambda dev, prec: asked.append(dev) or runtime.DeviceInfo("cpu", None))
    assert runtime.torch_is_cpu_only() is cpu_only
    assert eng.resolve_engine("auto", read_meta(bundle), "auto") == "onnx"
    assert asked == ([] if cpu_only else ["auto"])


@pytest.mark.parametrize("engine", ["onnx", "auto"])
def test_a_short_onnx_predict_never_imports_torch(bundle: Path, images: list[Path], cache: Path, engine: str) -> None:
    """The default CLI path on a CPU-only install: onnx engine, the cached export, torch not loaded."""
    from convlens.runtime import torch_is_cpu_only

    if engine == "auto" and not torch_is_cpu_only():
        pytest.skip("auto looks for a GPU through torch unless the installed torch is a CPU-only build")
    convlens.load(bundle, device="cpu", engine="onnx")  # the export, cached for the child below
    code = ("import sys; from convlens.infer.commands import predict_command; "
            f"predict_command({str(bundle)!r}, [{str(images[0])!r}], engine={engine!r}); "
            "print('torch loaded' if 'torch' in sys.modules else 'no torch')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(os.environ), timeout=120).stdout
    assert out.strip().endswith("no torch")


def test_auto_runs_onnx_equal_to_torch_and_reuses_the_cache(bundle: Path, images: list[Path], cache: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    clf = convlens.load(bundle, device="cpu")
    assert isinstance(clf.backend, eng.BundleOnnxBackend)
    assert len(onnx_files(cache)) == 1
    ref = convlens.load(bundle, device="cpu", engine="torch")
    assert isinstance(ref.backend, TorchBackend) and ref.backend.precision == "fp32"
    got, want = clf.predict(images, top_k=2), ref.predict(images, top_k=2)
    assert [p.label for p in got] == [p.label for p in want]
    np.testing.assert_allclose([list(p.probabilities.values()) for p in got],
                               [list(p.probabilities.values()) for p in want], atol=1e-5)

    def no_export(*args: object, **kwargs: object) -> None:
        raise AssertionError("the cached export should have been used")

    monkeypatch.setattr(export_onnx_module, "export_onnx", no_export)
    again = convlens.load(bundle, device="cpu")
    assert again.backend.path == clf.backend.path
    assert [p.to_dict() for p in again.predict(images)] == [p.to_dict() for p in clf.predict(images)]


def test_changed_weights_export_again(bundle: Path, tmp_path: Path, cache: Path) -> None:
    convlens.load(bundle, device="cpu")
    before = set(onnx_files(cache))
    other = fp32_bundle(tmp_path / "model.convlens", seed=1)
    path, exported = eng.cached_onnx(other, read_meta(other))
    assert exported and path not in before
    assert eng.cached_onnx(other, read_meta(other)) == (path, False)


def test_damaged_cached_file_is_exported_again(bundle: Path, images: list[Path]) -> None:
    meta = read_meta(bundle)
    path, _ = eng.cached_onnx(bundle, meta)
    good = path.read_bytes()
    damaged = bytearray(good)
    damaged[len(damaged) // 2] ^= 0xFF  # same size, one byte changed
    path.write_bytes(bytes(damaged))
    assert eng.cached_onnx(bundle, meta) == (path, True)
    record = json.loads(path.with_suffix(".json").read_text())
    assert record["bytes"] == path.stat().st_size
    path.with_suffix(".json").unlink()  # an interrupted write: the model without its record
    assert eng.cached_onnx(bundle, meta) == (path, True)
    assert convlens.load(bundle, device="cpu").predict(images)


def test_novelty_known_and_neighbours_equal_between_engines(novelty_case: Case) -> None:
    bundle, groups = novelty_case
    paths = [p for g in ("train", "known", "foreign") for p in groups[g]]
    onnx = convlens.load(bundle, device="cpu", engine="onnx")
    torch = convlens.load(bundle, device="cpu", precision="fp32", engine="torch")
    assert isinstance(onnx.backend, eng.BundleOnnxBackend) and onnx.novelty_index is not None
    got, want = onnx.predict(paths, neighbours=2), torch.predict(paths, neighbours=2)
    assert [(p.label, p.known) for p in got] == [(p.label, p.known) for p in want]
    assert sum(not p.known for p in got) == len(groups["foreign"])
    np.testing.assert_allclose([p.novelty for p in got], [p.novelty for p in want], atol=1e-5)
    np.testing.assert_allclose([p.probability for p in got], [p.probability for p in want], atol=1e-5)
    assert [[n["path"] for n in p.neighbours] for p in got] == [[n["path"] for n in p.neighbours] for p in want]


@pytest.mark.parametrize("method", ["cam", "gradcam"])
def test_explain_works_with_engine_auto(bundle: Path, images: list[Path], method: str) -> None:
    clf = convlens.load(bundle, device="cpu")
    assert isinstance(clf.backend, eng.BundleOnnxBackend) and method in clf.backend.explain_methods
    ref = convlens.load(bundle, device="cpu", engine="torch")
    got, want = clf.explain(images[:2], method=method), ref.explain(images[:2], method=method)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, atol=1e-3)


def test_evaluate_engines_agree(bundle: Path, tmp_path: Path) -> None:
    for cls, seed in (("cats", 0), ("dogs", 1)):
        write_images(tmp_path / "data" / cls, 4, seed=seed)
    runs = {e: convlens.evaluate(bundle, tmp_path / "data", out=tmp_path / e, engine=e, device="cpu")
            for e in ("torch", "onnx")}
    assert runs["torch"].metrics["accuracy"] == runs["onnx"].metrics["accuracy"]
    assert abs(runs["torch"].metrics["loss"] - runs["onnx"].metrics["loss"]) < 1e-5


@pytest.mark.parametrize("verb", ["predict", "evaluate", "serve"])
def test_bad_engine_is_one_line_exit_2(verb: str, bundle: Path, images: list[Path], capsys) -> None:
    extra = {"predict": [str(images[0])], "evaluate": [str(images[0].parent)], "serve": []}[verb]
    assert main([verb, str(bundle), *extra, "--engine", "onx"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "engine must be one of auto, torch, onnx. Received: engine='onx'" in err


def test_serve_runs_the_engine_and_still_draws_gradcam(bundle: Path, images: list[Path]) -> None:
    import warnings

    from convlens.serve.app import create_app

    with warnings.catch_warnings():  # starlette's note about httpx
        warnings.simplefilter("ignore")
        from fastapi.testclient import TestClient
    want = convlens.load(bundle, device="cpu", engine="torch").predict(images[0])[0]
    for engine, backend in (("auto", eng.BundleOnnxBackend), ("torch", TorchBackend)):
        app = create_app(bundle, engine=engine)
        assert isinstance(app.state.serve.classifier.backend, backend)
        with TestClient(app) as client:
            assert client.get("/model").json()["explain_methods"] == ["cam", "gradcam", "gradcam++"]
            upload = {"file": ("a.png", images[0].read_bytes(), "image/png")}
            got = client.post("/predict", files=upload).json()
            assert got["label"] == want.label and abs(got["probability"] - want.probability) < 1e-5
            r = client.post("/explain?method=gradcam", files=upload)
            assert r.status_code == 200 and r.json()["overlay_png"]


def test_a_short_predict_runs_torch_until_an_export_exists(tmp_path: Path, images: list[Path],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A few images do not pay for a first export: torch runs them; once serve, evaluate or a
    long job has exported the bundle, the same short job runs onnxruntime."""
    monkeypatch.setenv("CONVLENS_CACHE_DIR", str(tmp_path / "fresh"))
    model = fp32_bundle(tmp_path / "m.convlens", seed=5)
    short = convlens.load(model, engine="auto", images=len(images))
    assert isinstance(short.backend, TorchBackend) and not (tmp_path / "fresh" / "onnx").exists()
    long = convlens.load(model, engine="auto", images=eng.EXPORT_PAYS_OFF)
    assert isinstance(long.backend, eng.BundleOnnxBackend)
    again = convlens.load(model, engine="auto", images=1)
    assert isinstance(again.backend, eng.BundleOnnxBackend)  # the cached export is always used
    p_torch = [p.probabilities for p in short.predict(images)]
    p_onnx = [p.probabilities for p in again.predict(images)]
    for a, b in zip(p_torch, p_onnx, strict=True):
        assert all(abs(a[c] - b[c]) < 1e-5 for c in a)


# ----------------------------------------------------------------------------- eviction
def fake_export(folder: Path, key: str, bundle: Path, used: float, record: bool = True, model: bool = True) -> None:
    """A cache entry as eviction sees it (eviction never reads the graph), last used at ``used``."""
    folder.mkdir(parents=True, exist_ok=True)
    if model:
        (folder / f"{key}.onnx").write_bytes(b"graph")
        os.utime(folder / f"{key}.onnx", (used, used))
    if record:
        (folder / f"{key}.json").write_text(json.dumps({"key": key, "bundle": str(bundle)}))
        os.utime(folder / f"{key}.json", (used, used))


def keys_in(folder: Path) -> set[str]:
    return {p.stem for p in folder.iterdir() if not p.name.startswith(".")}


def test_eviction_keeps_the_most_recently_used_and_the_current(tmp_path: Path) -> None:
    folder = tmp_path / "onnx"
    for i in range(5):
        fake_export(folder, f"k{i}", tmp_path / f"m{i}.convlens", used=1000.0 + i)
    fake_export(folder, "cur", tmp_path / "cur.convlens", used=10.0)  # oldest mtime, yet just exported
    removed = eng.evict_exports(folder, "cur", tmp_path / "cur.convlens", keep=3)
    assert sorted(removed) == ["k0", "k1", "k2"]
    assert keys_in(folder) == {"cur", "k3", "k4"}


def test_a_new_export_replaces_the_same_paths_old_ones(tmp_path: Path) -> None:
    folder, here = tmp_path / "onnx", tmp_path / "run" / "model.convlens"
    fake_export(folder, "before", here, used=2000.0)  # the bundle's earlier content, used recently
    fake_export(folder, "elsewhere", tmp_path / "other.convlens", used=1000.0)
    fake_export(folder, "now", here, used=3000.0)
    assert eng.evict_exports(folder, "now", here) == ["before"]
    assert keys_in(folder) == {"elsewhere", "now"}


def test_eviction_removes_leftovers_of_interrupted_exports(tmp_path: Path) -> None:
    folder, here = tmp_path / "onnx", tmp_path / "m.convlens"
    fake_export(folder, "now", here, used=3000.0)
    fake_export(folder, "no_record", here.with_name("a"), used=3000.0, record=False)
    fake_export(folder, "no_model", here.with_name("b"), used=3000.0, model=False)
    fake_export(folder, "damaged", here.with_name("c"), used=3000.0)
    (folder / "damaged.json").write_text("{not json")
    (folder / ".now.onnx.x1y2.tmp").write_bytes(b"half")
    assert sorted(eng.evict_exports(folder, "now", here)) == ["damaged", "no_model", "no_record"]
    assert sorted(p.name for p in folder.iterdir()) == [".lock", "now.json", "now.onnx"]


def test_nothing_is_evicted_while_another_process_uses_the_cache(tmp_path: Path) -> None:
    """Another process finding, writing or opening an export holds exports_in_use: eviction
    then leaves everything (e.g. its half-written model, which has no record yet)."""
    import subprocess
    import sys

    folder, here = tmp_path / "onnx", tmp_path / "m.convlens"
    for i in range(3):
        fake_export(folder, f"k{i}", tmp_path / f"m{i}.convlens", used=1000.0 + i)
    fake_export(folder, "writing", here.with_name("w"), used=5000.0, record=False)
    fake_export(folder, "now", here, used=3000.0)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys\nfrom pathlib import Path\nfrom convlens.infer.engine import exports_in_use\n"
         f"with exports_in_use(Path({str(folder)!r})):\n    print('held', flush=True)\n    sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        assert eng.evict_exports(folder, "now", here, keep=1) == []
        assert keys_in(folder) == {"k0", "k1", "k2", "writing", "now"}
    finally:
        holder.communicate("", timeout=60)
    assert sorted(eng.evict_exports(folder, "now", here, keep=1)) == ["k0", "k1", "k2", "writing"]


def test_retraining_a_bundle_evicts_its_old_export_and_a_loaded_one_keeps_running(
        tmp_path: Path, images: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVLENS_CACHE_DIR", str(tmp_path / "cache"))
    path = fp32_bundle(tmp_path / "run" / "model.convlens", seed=7)
    serving = convlens.load(path, device="cpu")  # e.g. a server started before the retraining
    assert isinstance(serving.backend, eng.BundleOnnxBackend)
    old = serving.backend.path
    record = old.with_suffix(".json")
    os.utime(record, (1000.0, 1000.0))
    assert eng.cached_onnx(path, read_meta(path)) == (old, False)
    assert record.stat().st_mtime > 1000.0  # a hit counts as a use
    want = [p.probabilities for p in serving.predict(images)]
    fp32_bundle(path, seed=8)  # retrained in place
    new = convlens.load(path, device="cpu")
    assert onnx_files(tmp_path / "cache") == [new.backend.path] and not old.exists()
    assert [p.probabilities for p in serving.predict(images)] == want  # its session needs no file
