"""report.html: self-contained (no URL but data:), the sections a folder's files call for, atomic;
``explainkit report DIR`` rebuilds it. (The page in a real browser: tests/test_browser.py.)"""

from __future__ import annotations

import json
import re

import pytest
from PIL import Image

from explainkit.cli import main
from explainkit.errors import ExplainkitError
from explainkit.jobs.report import build_report, write_report


def _png(path, color="red"):
    Image.new("RGB", (40, 30), color).save(path)


@pytest.fixture
def explain_folder(tmp_path):
    summary = {
        "schema_version": 1,
        "model": "m.pt",
        "architecture": "resnet18-cifar",
        "layer": "layer4",
        "images": 20,
        "accuracy": 0.85,
        "misclassified": 3,
        "timings": {"total_seconds": 1.5},
        "provenance": {
            "explainkit": "0.1.0",
            "torch": "2.x",
            "command": "python -m explainkit explain <x>",
            "model_sha256": "ab" * 32,
        },
        "card": {"architecture": "resnet18-cifar", "classes": ["a", "b"]},
    }
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    for name in ("per_class.png", "misclassified.png", "methods.png", "confusion_matrix.png"):
        _png(tmp_path / name)
    return tmp_path


def test_explain_folder_has_every_section_and_nothing_external(explain_folder):
    page = build_report(explain_folder)
    for section in ("provenance", "model-card", "accuracy", "per-class", "misclassified", "methods"):
        assert f'<section id="{section}">' in page
    assert "85.00%" in page and "abab" in page
    assert "&lt;x&gt;" in page and "<x>" not in page  # escaped
    urls = re.findall(r'(?:src|href)="([^"#][^"]*)"', page)
    assert urls and all(url.startswith("data:image/png;base64,") for url in urls)
    assert "http" not in page.replace("http-equiv", "")


def test_evaluate_and_train_outputs_get_their_sections(tmp_path):
    metrics = {
        "schema_version": 1,
        "gradcam": {
            "deletion_auc": 0.3,
            "insertion_auc": 0.5,
            "ci95": {"deletion_auc": [0.28, 0.33], "insertion_auc": [0.45, 0.55]},
        },
        "meta": {"model": "m.pt", "images": 200},
    }
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    _png(tmp_path / "deletion_insertion.png")
    (tmp_path / "model.json").write_text(json.dumps({"architecture": "resnet18-cifar", "test_accuracy": 0.9}))
    (tmp_path / "history.csv").write_text("epoch,train_loss,test_accuracy\n1,1.5,0.5\n2,1.0,0.7\n")
    _png(tmp_path / "curves.png")
    page = build_report(tmp_path)
    assert '<section id="evaluate">' in page and "0.300 [0.280, 0.330]" in page
    assert '<section id="training">' in page and "<td>0.7</td>" in page
    assert '<section id="provenance">' not in page


def test_an_empty_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ExplainkitError, match="holds no explain, evaluate or train outputs"):
        build_report(tmp_path)
    with pytest.raises(ExplainkitError, match="not a directory"):
        build_report(tmp_path / "missing")


def test_report_command_rebuilds_and_leaves_no_temp_files(capsys, explain_folder):
    assert main(["report", str(explain_folder)]) == 0
    assert capsys.readouterr().out.strip().endswith("report.html")
    assert (explain_folder / "report.html").stat().st_size > 1000
    assert not [p for p in explain_folder.iterdir() if p.name.startswith(".") or p.suffix == ".tmp"]
    assert main(["report", str(explain_folder / "nothing")]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_write_report_to_another_path(explain_folder, tmp_path):
    target = write_report(explain_folder, tmp_path / "elsewhere.html")
    assert target.read_text().startswith("<!DOCTYPE html>")
