"""Batch tab: many images or a zip -> a row per file, a CSV, and train.py evaluate's metrics when
the zip has class folders; bounded and safe against hostile archives; callable as /batch."""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import cv2
import pandas as pd
import pytest
from gradio_client import Client, handle_file

from kdcore.app import batch
from kdcore.app.batch import BatchError, analyse_batch, collect_batch
from kdcore.app.service import load_models
from kdcore.config import CLASS_NAMES

ASSETS = Path(__file__).resolve().parent.parent / "assets"


@pytest.fixture(scope="module")
def models(tiny_checkpoints):
    return load_models(tiny_checkpoints["student"].parent)


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zipped:
        for name, data in members.items():
            zipped.writestr(name, data)
    return path


def _png(seed: int) -> bytes:
    image = cv2.imread(str(ASSETS / "phantom_round_lesion.png"), cv2.IMREAD_GRAYSCALE)
    return cv2.imencode(".png", cv2.flip(image, seed % 2))[1].tobytes()


def test_zip_with_class_folders_gets_evaluate_metrics(models, tmp_path):
    members = {f"scans/{label}/{i}.png": _png(i) for label in CLASS_NAMES for i in range(2)}
    members["scans/notes.txt"] = b"ignored"
    members["scans/benign/broken.png"] = b"not a png"
    work = tmp_path / "work"
    work.mkdir()
    items = collect_batch([str(_zip(tmp_path / "set.zip", members))], work)
    assert len(items) == 7 and {i.true_label for i in items} == set(CLASS_NAMES)
    result = analyse_batch(models, items, tmp_path)
    table = result.table
    assert list(table.columns) == list(batch.ROW_COLUMNS) and len(table) == 7
    broken = table[table["file"] == "scans/benign/broken.png"].iloc[0]
    assert broken["flags"].startswith("not analysed: scans/benign/broken.png")
    assert "6 of 7 files analysed, 1 refused" in result.metrics_markdown
    assert "### Student on this batch (n=6)" in result.metrics_markdown and "| accuracy |" in result.metrics_markdown
    assert result.confusion_png.is_file()
    assert set(table["agree"]) <= {"yes", "NO", ""}


def test_loose_files_get_rows_but_no_metrics(models, tmp_path):
    shutil.copy(ASSETS / "phantom_no_lesion.png", tmp_path / "a.png")
    result = analyse_batch(models, collect_batch([str(tmp_path / "a.png")], tmp_path), tmp_path)
    assert len(result.table) == 1 and result.confusion_png is None
    assert "need every image in a benign/" in result.metrics_markdown
    assert 0.0 <= float(result.table.loc[0, "student p(malignant)"]) <= 1.0


def test_hostile_archives_are_refused_clearly(tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    escape = _zip(tmp_path / "escape.zip", {"../../evil/benign/x.png": _png(0)})
    items = collect_batch([str(escape)], work)
    assert [p.parent for p in (i.path for i in items)] == [work]  # written under our own name only
    assert not (tmp_path.parent / "evil").exists()
    (tmp_path / "bad.zip").write_bytes(b"PK not really")
    with pytest.raises(BatchError, match="not a readable zip"):
        collect_batch([str(tmp_path / "bad.zip")], work)
    monkeypatch.setattr(batch, "MAX_BATCH_FILES", 3)
    many = _zip(tmp_path / "many.zip", {f"{i}.png": _png(i) for i in range(4)})
    with pytest.raises(BatchError, match="more than 3 images"):
        collect_batch([str(many)], work)
    monkeypatch.setattr(batch, "MAX_ZIP_BYTES", 10)
    with pytest.raises(BatchError, match="unpacks to more than"):
        collect_batch([str(escape)], work)
    with pytest.raises(BatchError, match="no image in the upload"):
        collect_batch([str(_zip(tmp_path / "empty.zip", {"a.txt": b"x"}))], work)


def test_batch_api(tiny_checkpoints, tmp_path):
    from app_helpers import launch

    archive = _zip(tmp_path / "set.zip", {f"{label}/{label}.png": _png(1) for label in CLASS_NAMES})
    demo = launch(tiny_checkpoints["student"].parent)
    try:
        client = Client(demo.local_url, verbose=False)
        table, csv_path, metrics, confusion = client.predict([handle_file(archive)], api_name="/batch")
        client.close()
    finally:
        demo.close()
    assert len(table["data"]) == 3 and "Teacher on this batch (n=3)" in metrics
    assert len(pd.read_csv(csv_path)) == 3 and Path(confusion).is_file()
