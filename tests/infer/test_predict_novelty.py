"""Novelty on every prediction path of a bundle: the API (unknown, --no-reject, the cut-off,
neighbours, TTA), ``convlens predict`` (table, CSV, JSON, bad options, the old-bundle note)
and ``convlens explain``."""

from __future__ import annotations

import csv
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import convlens
from convlens.cli import main
from convlens.errors import ConfigError
from convlens.infer.bundle import load_model, read_novelty
from convlens.infer.classifier import UNKNOWN
from convlens.infer.novelty import normalise
from tests.bundles import make_bundle

Case = tuple[Path, dict[str, list[Path]]]


def _clf(path: Path) -> convlens.infer.Classifier:
    return convlens.load(path, device="cpu", precision="fp32", engine="torch")


def test_foreign_images_are_unknown_and_keep_the_models_answer(novelty_case: Case) -> None:
    bundle, groups = novelty_case
    clf = _clf(bundle)
    assert clf.has_novelty and clf.novelty_threshold == read_novelty(bundle).threshold
    known = clf.predict(groups["known"] + groups["train"])
    foreign = clf.predict(groups["foreign"])
    assert all(p.known and p.label in clf.classes and p.novelty <= clf.novelty_threshold for p in known)
    assert all(not p.known and p.label == UNKNOWN and p.novelty > clf.novelty_threshold for p in foreign)
    plain = clf.predict(groups["foreign"], reject=False)
    for rejected, kept in zip(foreign, plain, strict=True):
        # The class choice is the model's own either way; only the label and `known` differ.
        assert kept.known and kept.label == clf.classes[kept.index]
        assert (rejected.index, rejected.probability, rejected.probabilities, rejected.novelty) == (
            kept.index, kept.probability, kept.probabilities, kept.novelty)
        assert rejected.to_dict()["novelty"] == rejected.novelty and rejected.to_dict()["known"] is False


def test_novelty_is_the_index_score_of_the_models_pooled_features(novelty_case: Case) -> None:
    bundle, groups = novelty_case
    model, meta = load_model(bundle)
    index = read_novelty(bundle)
    images = groups["known"] + groups["foreign"]
    x = torch.from_numpy(meta.preprocessing.normalize(np.stack([meta.preprocessing.load(p) for p in images])))
    with torch.no_grad():
        pooled = model.forward_features(x).mean((2, 3)).numpy()
    got = [p.novelty for p in _clf(bundle).predict(images)]
    np.testing.assert_allclose(got, index.scores(pooled), atol=1e-5)


def test_the_cut_off_can_be_moved(novelty_case: Case) -> None:
    bundle, groups = novelty_case
    clf = _clf(bundle)
    scores = sorted(p.novelty for p in clf.predict(groups["foreign"]))
    middle = (scores[1] + scores[2]) / 2
    preds = clf.predict(groups["foreign"], novelty_threshold=middle)
    assert sum(p.known for p in preds) == 2 and all(p.known == (p.novelty <= middle) for p in preds)
    assert all(p.known for p in clf.predict(groups["foreign"], novelty_threshold=2.0))
    assert not any(p.known for p in clf.predict(groups["known"], novelty_threshold=0.0) if p.novelty > 0)


def test_neighbours_are_the_nearest_training_images(novelty_case: Case) -> None:
    bundle, groups = novelty_case
    clf = _clf(bundle)
    model, meta = load_model(bundle)
    index = read_novelty(bundle)
    images = groups["train"][:3] + groups["foreign"][:2]
    x = torch.from_numpy(meta.preprocessing.normalize(np.stack([meta.preprocessing.load(p) for p in images])))
    with torch.no_grad():
        pooled = model.forward_features(x).mean((2, 3)).numpy()
    # Brute force: cosine similarity of every image to every training row.
    sims = np.minimum(1.0, normalise(pooled) @ index.reference.astype(np.float32).T)
    for pred, row_sims in zip(clf.predict(images, neighbours=3), sims, strict=True):
        near = pred.neighbours
        assert len(near) == 3 and set(near[0]) == {"path", "class", "similarity"}
        assert [n["similarity"] for n in near] == pytest.approx(np.sort(row_sims)[::-1][:3], abs=1e-5)
        for n in near:
            row = index.paths.index(n["path"])
            assert n["similarity"] == pytest.approx(row_sims[row], abs=1e-5)
            assert n["class"] == clf.classes[int(index.labels[row])] and n["path"].startswith("train/img")
    assert clf.predict(images[0])[0].neighbours is None  # only when asked for


def test_tta_novelty_is_the_plain_images(novelty_case: Case) -> None:
    bundle, groups = novelty_case
    clf = _clf(bundle)
    plain = clf.predict(groups["foreign"] + groups["known"])
    crops = clf.predict(groups["foreign"] + groups["known"], tta="crops")
    assert [p.novelty for p in crops] == pytest.approx([p.novelty for p in plain], abs=1e-6)
    assert [p.known for p in crops] == [p.known for p in plain]
    probs, novelty = clf.proba_and_novelty(np.stack([clf.preprocessing.load(p) for p in groups["foreign"]]))
    assert novelty == pytest.approx([p.novelty for p in plain[:5]], abs=1e-6) and probs.shape == (5, 2)


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"novelty_threshold": -0.1}, "novelty_threshold must be a number of 0 or more"),
    ({"novelty_threshold": float("nan")}, "novelty_threshold must be a number of 0 or more"),
    ({"novelty_threshold": "high"}, "novelty_threshold must be a number of 0 or more"),
    ({"novelty_threshold": 0.5, "reject": False}, "no effect without rejection"),
    ({"neighbours": -1}, "neighbours must be a whole number"),
    ({"neighbours": 1.5}, "neighbours must be a whole number"),
])
def test_bad_novelty_options_are_one_line_errors(novelty_case: Case, kwargs: dict, needle: str) -> None:
    bundle, groups = novelty_case
    with pytest.raises(ConfigError, match=needle):
        _clf(bundle).predict(groups["known"][0], **kwargs)


def test_an_old_bundle_predicts_as_before(tmp_path: Path) -> None:
    old = make_bundle(tmp_path / "old.convlens")
    clf = _clf(old)
    image = np.full((20, 20, 3), 200, np.uint8)
    (pred,) = clf.predict(image)
    assert not clf.has_novelty and clf.novelty_threshold is None and clf.novelty_note
    assert pred.novelty is None and pred.known and pred.label == clf.classes[pred.index]
    with pytest.raises(ConfigError, match="trained before novelty"):
        clf.predict(image, neighbours=2)
    with pytest.raises(ConfigError, match="trained before"):
        clf.predict(image, novelty_threshold=0.3)


# ----------------------------------------------------------------------------- CLI
def test_cli_csv_and_json_carry_novelty(novelty_case: Case, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bundle, groups = novelty_case
    images = [str(p) for p in groups["known"][:2] + groups["foreign"][:2]]
    out = tmp_path / "p.csv"
    assert main(["predict", str(bundle), *images, "--out", str(out), "--precision", "fp32"]) == 0
    captured = capsys.readouterr()
    assert "novelty" in captured.out.splitlines()[0] and captured.out.count(UNKNOWN) == 2
    assert "trained before" not in captured.err
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0]) == ["path", "label", "probability", "novelty", "known", "p_cats", "p_dogs", "error"]
    api = _clf(bundle).predict(images)
    for row, pred in zip(rows, api, strict=True):
        assert row["label"] == pred.label and row["known"] == ("true" if pred.known else "false")
        assert float(row["novelty"]) == pytest.approx(pred.novelty, abs=1e-6)
    assert [r["label"] for r in rows[2:]] == [UNKNOWN, UNKNOWN]

    out = tmp_path / "p.json"
    assert main(["predict", str(bundle), *images, "--out", str(out), "--neighbours", "2", "--no-reject",
                 "--precision", "fp32"]) == 0
    preds = json.loads(out.read_text())["predictions"]
    assert [p["known"] for p in preds] == [True] * 4 and all(p["label"] != UNKNOWN for p in preds)
    assert all(len(p["neighbours"]) == 2 and p["neighbours"][0]["path"].startswith("train/") for p in preds)
    assert preds[3]["novelty"] == pytest.approx(api[3].novelty, abs=1e-6)

    out = tmp_path / "n.csv"
    assert main(["predict", str(bundle), images[0], "--out", str(out), "--neighbours", "1",
                 "--novelty-threshold", "1.5", "--precision", "fp32"]) == 0
    (row,) = csv.DictReader(out.open())
    assert list(row)[-2:] == ["neighbours", "error"] and row["neighbours"].startswith("train/img")


@pytest.mark.parametrize(("args", "needle"), [
    (["--novelty-threshold", "-1"], "novelty_threshold must be a number of 0 or more"),
    (["--novelty-threshold", "abc"], "invalid float value"),
    (["--neighbours", "-2"], "neighbours must be a whole number"),
    (["--no-reject", "--novelty-threshold", "0.1"], "no effect without rejection"),
])
def test_cli_bad_novelty_options_exit_2(novelty_case: Case, args: list[str], needle: str,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    bundle, groups = novelty_case
    try:
        rc = main(["predict", str(bundle), str(groups["known"][0]), *args])
    except SystemExit as e:  # argparse's own type errors
        rc = e.code
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err


def test_cli_old_bundle_notes_once_and_refuses_neighbours(tmp_path: Path, novelty_case: Case,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    old = make_bundle(tmp_path / "old.convlens")
    images = [str(p) for p in novelty_case[1]["known"]]
    assert main(["predict", str(old), *images, "--batch-size", "2"]) == 0
    captured = capsys.readouterr()
    assert captured.err.count("trained before novelty scores existed") == 1
    assert len([ln for ln in captured.err.splitlines() if "retrain" in ln or "novelty" in ln]) == 1  # not wrapped
    assert captured.out.splitlines()[0].split("\t") == ["file", "label", "probability"]
    assert UNKNOWN not in captured.out
    for args in (["--neighbours", "2"], ["--novelty-threshold", "0.2"]):
        assert main(["predict", str(old), images[0], *args]) == 2
        err = capsys.readouterr().err.strip()
        assert "trained before" in err and len(err.splitlines()) == 1, err


def test_cli_refuses_a_damaged_novelty_section(novelty_case: Case, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    bundle, groups = novelty_case
    damaged = tmp_path / "damaged.convlens"
    with zipfile.ZipFile(bundle) as zin, zipfile.ZipFile(damaged, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            zout.writestr(item, data[:-8] + b"\0" * 8 if item.filename == "novelty.safetensors" else data)
    assert main(["predict", str(damaged), str(groups["known"][0])]) == 2
    err = capsys.readouterr().err.strip()
    assert "novelty.safetensors does not match its recorded SHA-256" in err and len(err.splitlines()) == 1


def test_cli_explain_shows_unknown(novelty_case: Case, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bundle, groups = novelty_case
    out = tmp_path / "ex"
    images = [str(groups["known"][0]), str(groups["foreign"][0])]
    assert main(["explain", str(bundle), *images, "--out", str(out)]) == 0
    assert UNKNOWN in capsys.readouterr().out
    rows = json.loads((out / "explanations.json").read_text())["images"]
    assert [r["known"] for r in rows] == [True, False]
    assert rows[0]["label"] in ("cats", "dogs") and rows[1]["label"] == UNKNOWN
    assert rows[1]["explained"] in ("cats", "dogs") and rows[1]["novelty"] > rows[0]["novelty"]
    assert (out / "grid.png").is_file()
