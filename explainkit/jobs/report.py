"""``report.html``: one self-contained page from whatever an output folder holds.

Reads the files ``explain`` (``summary.json`` and its figures), ``evaluate`` (``metrics.json``,
``deletion_insertion.png``, ``sanity.png``) and ``train`` (``model.json``, ``history.csv``,
``curves.png``, ``confusion_matrix.png``, ...) write, and lays them out as sections. Images are
embedded as ``data:`` URIs and the CSS is inline: the page makes no network request and opens
from disk in any browser. Why by hand and not a templating library: one page of plain HTML with
escaping is all it needs, and it adds no dependency.
"""

from __future__ import annotations

import base64
import csv
import html
import json
from pathlib import Path
from typing import Any, Iterable

from explainkit.errors import ExplainkitError
from explainkit.runtime.io import atomic_path

REPORT_NAME = "report.html"

CSS = """
:root { color-scheme: light; }
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0; color: #1b1b1f; background: #fafafa; }
main { max-width: 1180px; margin: 0 auto; padding: 1rem 1.25rem 3rem; }
header { background: #24243a; color: #fff; padding: 1rem 1.25rem; }
header h1 { margin: 0; font-size: 1.4rem; } header p { margin: .25rem 0 0; opacity: .85; }
nav { margin: .75rem 0 0; display: flex; flex-wrap: wrap; gap: .75rem; }
nav a { color: #cfd3ff; }
section { background: #fff; border: 1px solid #e3e3ea; border-radius: 8px; padding: .75rem 1rem 1rem; margin: 1rem 0; }
h2 { font-size: 1.15rem; margin: .25rem 0 .75rem; }
figure { margin: .5rem 0; } figcaption { font-size: .85rem; color: #55556a; }
img { max-width: 100%; height: auto; display: block; }
.table { overflow-x: auto; }
table { border-collapse: collapse; font-size: .9rem; }
th, td { border-bottom: 1px solid #e3e3ea; padding: .3rem .6rem; text-align: left; vertical-align: top; }
th { background: #f3f3f8; }
code { font-size: .85rem; word-break: break-all; }
.big { font-size: 1.6rem; font-weight: 600; }
"""


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _image(path: Path, alt: str, caption: str = "", width: int | None = None) -> str:
    """An embedded PNG; ``width``: the most CSS pixels it takes (small figures stay small)."""
    encoded = base64.b64encode(path.read_bytes()).decode("ascii")
    note = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
    style = f' style="max-width: min(100%, {width}px)"' if width else ""
    return f'<figure><img alt="{html.escape(alt)}"{style} src="data:image/png;base64,{encoded}">{note}</figure>'


def _table(header: Iterable[str], rows: Iterable[Iterable[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(cell))}</th>" for cell in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(cell))}</td>" for cell in row) + "</tr>" for row in rows)
    return f'<div class="table"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _pairs(data: dict[str, Any]) -> str:
    rows = [(key, json.dumps(value) if isinstance(value, (dict, list)) else value) for key, value in data.items()]
    return _table(("field", "value"), rows)


class _Page:
    def __init__(self) -> None:
        self.sections: list[tuple[str, str, str]] = []  # (id, title, body)

    def add(self, anchor: str, title: str, *parts: str) -> None:
        body = "".join(part for part in parts if part)
        if body:
            self.sections.append((anchor, title, body))

    def render(self, title: str, subtitle: str) -> str:
        nav = "".join(f'<a href="#{anchor}">{html.escape(name)}</a>' for anchor, name, _ in self.sections)
        sections = "".join(
            f'<section id="{anchor}"><h2>{html.escape(name)}</h2>{body}</section>' for anchor, name, body in self.sections
        )
        return (
            '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>"
            f"<header><h1>{html.escape(title)}</h1><p>{html.escape(subtitle)}</p><nav>{nav}</nav></header>"
            f"<main>{sections}</main></body></html>\n"
        )


def _explain_sections(page: _Page, folder: Path, summary: dict[str, Any]) -> None:
    provenance = dict(summary.get("provenance") or {})
    run: dict[str, Any] = {
        key: summary[key]
        for key in ("model", "architecture", "device", "layer", "methods", "images", "world_size")
        if key in summary
    }
    page.add(
        "provenance", "Provenance", _pairs({**run, **provenance}), _pairs(summary["timings"]) if summary.get("timings") else ""
    )
    if summary.get("card"):
        page.add("model-card", "Model card", _pairs(summary["card"]))
    accuracy = summary.get("accuracy")
    if accuracy is not None:
        headline = (
            f'<p><span class="big">{100 * accuracy:.2f}%</span> accuracy on {summary.get("images")} images; '
            f"{summary.get('misclassified')} misclassified.</p>"
        )
        matrix = folder / "confusion_matrix.png"
        page.add(
            "accuracy",
            "Accuracy",
            headline,
            _image(matrix, "confusion matrix", "Rows: true class, normalised", 640) if matrix.is_file() else "",
        )
    if summary.get("predictions"):
        rows = [(p["image"], p["predicted"], f"{p['probability']:.3f}") for p in summary["predictions"]]
        page.add("predictions", "Predictions", _table(("image", "predicted", "probability"), rows))
    figures = [
        (
            "per-class",
            "Per-class maps",
            "per_class.png",
            "Each image's map for every class (or its top-k), with the model's probability",
        ),
        ("misclassified", "Misclassified", "misclassified.png", "Spread over the true classes, most confident mistakes first"),
        ("methods", "Method comparison", "methods.png", "Maps for the predicted class, one shared colour scale"),
    ]
    for anchor, title, name, caption in figures:
        if (folder / name).is_file():
            page.add(anchor, title, _image(folder / name, title, caption, 560 if anchor == "misclassified" else None))
    _task_sections(page, folder, summary)


def _task_sections(page: _Page, folder: Path, summary: dict[str, Any]) -> None:
    """``explain --task``'s figures (as its summary lists them) and what each image's maps explain."""
    if summary.get("task"):
        page.add("task", "Task", _pairs({key: summary[key] for key in ("task", "target", "model_output") if key in summary}))
    for number, shown in enumerate(summary.get("figures") or []):
        path = folder / str(shown.get("file", ""))
        if path.is_file() and path.parent == folder:  # names from the summary: never outside the folder
            page.add(
                f"figure-{number}", str(shown.get("title", path.stem)), _image(path, path.stem, str(shown.get("caption", "")))
            )
    if summary.get("explained"):
        rows = [(row.get("image", ""), _what(row)) for row in summary["explained"]]
        page.add("explained", "What was explained", _table(("image", "explained"), rows))


def _what(row: dict[str, Any]) -> str:
    if "boxes" in row:
        return "; ".join(f"{b['label']} {b['score']:.2f}" for b in row["boxes"]) or "no box"
    if "labels" in row:
        return "; ".join(f"{b['label']} p={b['probability']:.2f}" for b in row["labels"]) or "no label"
    if "region" in row:
        return f"{row['region']}: {row['region_pixels']} pixels"
    return f"cosine similarity {row.get('cosine_similarity', '')}"


def _evaluate_section(page: _Page, folder: Path, metrics: dict[str, Any]) -> None:
    meta = metrics.get("meta") or {}
    methods = {
        name: scores for name, scores in metrics.items() if isinstance(scores, dict) and name != "meta" and "ci95" in scores
    }
    columns: list[str] = []
    for scores in methods.values():
        columns += [
            key
            for key in scores
            if key not in ("ci95", "sanity") and key not in columns and not isinstance(scores[key], (dict, list))
        ]
    rows = []
    for name, scores in methods.items():
        cells = []
        for column in columns:
            value, interval = scores.get(column), scores["ci95"].get(column)
            cells.append(
                "-" if value is None else (f"{value:.3f} [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else f"{value:.3f}")
            )
        rows.append((name, *cells))
    parts = [_pairs(meta) if meta else "", _table(("method", *columns), rows) if rows else ""]
    for name, caption in (("deletion_insertion.png", "Deletion and insertion curves"), ("sanity.png", "Cascading randomisation")):
        if (folder / name).is_file():
            parts.append(_image(folder / name, caption, caption))
    page.add("evaluate", "Faithfulness (mean [95% bootstrap CI])", *parts)


def _training_section(page: _Page, folder: Path) -> None:
    parts = []
    card = _read_json(folder / "model.json")
    if card:
        parts.append(_pairs(card))
    history = folder / "history.csv"
    if history.is_file():
        with history.open() as handle:
            rows = list(csv.reader(handle))
        if rows:
            parts.append(_table(rows[0], rows[1:]))
    for name, caption in (
        ("curves.png", "Loss and accuracy per epoch"),
        ("lr_find.png", "LR range test"),
        ("samples.png", "Augmented training samples"),
    ):
        if (folder / name).is_file():
            parts.append(_image(folder / name, caption, caption))
    if not (folder / "summary.json").is_file():  # train's own figures (explain's are drawn above)
        for name, caption in (
            ("confusion_matrix.png", "Test confusion matrix"),
            ("misclassified.png", "Misclassified test images"),
        ):
            if (folder / name).is_file():
                parts.append(_image(folder / name, caption, caption))
    page.add("training", "Training", *parts)


def build_report(folder: str | Path) -> str:
    """The HTML of ``folder``'s report; an error when it holds no explainkit outputs."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ExplainkitError(f"{folder} is not a directory")
    page = _Page()
    summary = _read_json(folder / "summary.json")
    metrics = _read_json(folder / "metrics.json")
    if summary:
        _explain_sections(page, folder, summary)
    if metrics:
        _evaluate_section(page, folder, metrics)
    _training_section(page, folder)
    if not page.sections:
        raise ExplainkitError(f"{folder} holds no explain, evaluate or train outputs (summary.json, metrics.json, model.json)")
    architecture = (summary or {}).get("architecture") or ((metrics or {}).get("meta") or {}).get("model") or folder.name
    created = ((summary or {}).get("provenance") or {}).get("created", "")
    return page.render(f"explainkit report: {architecture}", f"{folder.resolve()} {created}".strip())


def write_report(folder: str | Path, path: str | Path | None = None) -> Path:
    """Write :func:`build_report` to ``path`` (default ``folder/report.html``) atomically."""
    target = Path(path) if path is not None else Path(folder) / REPORT_NAME
    text = build_report(folder)
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return target
