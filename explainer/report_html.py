"""report.html: the evaluation's and the audit's tables and figures as one self-contained page a person opens.

Everything is inside the file (PNG figures as data: URIs, the style and the few lines of script that sort a table
when its header is clicked), so it can be mailed or opened offline; nothing is fetched from a network. The numbers are
the ones results.json / audit.json hold: nothing is measured here.
"""

from __future__ import annotations

import base64
import html
import math
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;max-width:1400px}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:.6em 0;font-size:.85em}
th,td{border:1px solid #ccc;padding:.25em .5em;text-align:right}
th{background:#f0f0f0;cursor:pointer;user-select:none}td:first-child,th:first-child{text-align:left}
th.asc::after{content:" \\25B2"}th.desc::after{content:" \\25BC"}
p.note{font-size:.85em;color:#555;max-width:100em}
figure{display:inline-block;margin:.4em}figure img{max-width:100%;border:1px solid #ddd}
figcaption{font-size:.8em;color:#555}
"""

# Click a header: sort that column (numbers as numbers, "-" last), again: the other way.
SCRIPT = """
document.querySelectorAll('table.sortable').forEach(function (table) {
  table.querySelectorAll('th').forEach(function (th, col) {
    th.addEventListener('click', function () {
      var body = table.tBodies[0];
      var rows = Array.prototype.slice.call(body.rows);
      var up = !th.classList.contains('asc');
      table.querySelectorAll('th').forEach(function (h) { h.classList.remove('asc', 'desc'); });
      th.classList.add(up ? 'asc' : 'desc');
      function key(row) {
        var text = row.cells[col].textContent.trim();
        var num = parseFloat(text);
        return isNaN(num) || text === '-' ? [1, text] : [0, num];
      }
      rows.sort(function (a, b) {
        var x = key(a), y = key(b);
        if (x[0] !== y[0]) { return x[0] - y[0]; }
        var c = x[1] < y[1] ? -1 : (x[1] > y[1] ? 1 : 0);
        return up ? c : -c;
      });
      rows.forEach(function (row) { body.appendChild(row); });
    });
  });
});
"""


def cell(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and (math.isnan(value) or math.isinf(value))):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return html.escape(str(value))


def table(columns: Sequence[str], rows: Sequence[Sequence[Any]], digits: int = 3) -> str:
    """A sortable table (click a header)."""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{cell(v, digits)}</td>" for v in row) + "</tr>" for row in rows)
    return f'<table class="sortable"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def figure(data: bytes, caption: str) -> str:
    return (f'<figure><img alt="{html.escape(caption)}" src="{png_uri(data)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def file_figures(out: Path, paths: Sequence[str]) -> str:
    """The run's PNG figures (paths relative to `out`) embedded; a missing file is left out."""
    return "".join(figure((out / p).read_bytes(), Path(p).stem) for p in paths if (out / p).is_file())


def page(title: str, parts: Sequence[str]) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>"
            f"<h1>{html.escape(title)}</h1>{''.join(parts)}<script>{SCRIPT}</script></body></html>\n")


def section(heading: str, note: str, content: str) -> str:
    return f"<h2>{html.escape(heading)}</h2>" + (f'<p class="note">{html.escape(note)}</p>' if note else "") + content


# ----------------------------------------------------------------------------------------------------------------------
# evaluate
# ----------------------------------------------------------------------------------------------------------------------


def evaluate_html(res: dict[str, Any], out: Path, galleries: Galleries | None = None) -> str:
    """The evaluation page: every report table (W&B's tables, the same), the figures, per-class localization and
    per-class galleries (each method's map of the class side by side, from the figure images)."""
    from explainer.eval_report import wandb_tables

    info = res.get("settings", {})
    parts = [f'<p class="note">explainer {cell(info.get("checkpoint"))}, classifier {cell(info.get("classifier"))}, '
             f'data {cell(info.get("manifest"))} split {cell(info.get("split"))}: {res["n_images"]} images, '
             f'{res["n_seg_images"]} with segmentation; {cell(info.get("date"))}</p>']
    notes = {"localization": "WSOL as Choe et al. 2020 (wsolevaluation), percent: see report.md for the protocol.",
             "localization_per_class": "BoxAcc at IoU 50 (all contours) at each method's best threshold, percent; "
                                       "click a header to sort.",
             "segmentation": "Paper Table 2.", "classification": "Paper Table 4.", "timing": "Paper Table 3."}
    for name, (columns, rows) in wandb_tables(res).items():
        parts.append(section(name.replace("_", " "), notes.get(name, ""), table(columns, rows)))
    parts.append(section("figures", "", file_figures(out, res.get("figures", []))))
    if galleries is not None and galleries.kept:
        parts.append(section("per-class galleries", f"Each method's map of the class side by side, the first "
                             f"{galleries.per_class} test images of each class (of the first process).",
                             class_galleries(galleries, res["classes"])))
    return page("Evaluation report", parts)


class Galleries:
    """Per class, the first `per_class` images (of this process) that contain it, with every method's map of that
    class, kept small (`size` px) for report.html; up to `max_classes` classes, in the order they are met."""

    def __init__(self, num_classes: int, per_class: int = 2, max_classes: int = 40, size: int = 96) -> None:
        self.per_class, self.max_classes, self.size = per_class, max_classes, size
        self.kept: dict[int, list[tuple[Any, dict[str, Any]]]] = {}
        self.num_classes = num_classes

    def wants(self, labels: Any) -> bool:
        present = (labels > 0).any(0).nonzero().flatten().tolist()
        return any(len(self.kept.get(k, [])) < self.per_class and (k in self.kept or len(self.kept) < self.max_classes)
                   for k in present)

    def add(self, images: Any, labels: Any, maps: dict[str, Any]) -> None:
        """images [B, 3, H, W] in [0, 1] (denormalised), labels [B, C], maps: method -> [B, C, h, w]."""
        import torch.nn.functional as F

        small = F.interpolate(images.float().cpu(), size=(self.size, self.size), mode="bilinear", align_corners=False)
        for i, k in (labels > 0).nonzero().tolist():
            entries = self.kept.get(k, [])
            if len(entries) >= self.per_class or (k not in self.kept and len(self.kept) >= self.max_classes):
                continue
            per_method = {m: F.interpolate(v[i : i + 1, k : k + 1].float().cpu(), size=(self.size, self.size),
                                           mode="bilinear", align_corners=False)[0, 0] for m, v in maps.items()}
            self.kept[k] = [*entries, (small[i], per_method)]


def class_galleries(galleries: Galleries, classes: Sequence[str]) -> str:
    """One strip per class: each kept image, then every method's map of that class side by side."""
    import torch

    from explainer.figures import fig1_panel

    parts = []
    for k in sorted(galleries.kept):
        entries = galleries.kept[k]
        images = torch.stack([e[0] for e in entries])
        labels = torch.zeros(len(entries), len(classes))
        labels[:, k] = 1
        maps = {m: torch.zeros(len(entries), len(classes), galleries.size, galleries.size) for m in entries[0][1]}
        for j, (_, per_method) in enumerate(entries):
            for m, v in per_method.items():
                maps[m][j, k] = v
        with tempfile.TemporaryDirectory() as tmp:
            png = fig1_panel(images, labels, maps, classes, Path(tmp) / "gallery.png").read_bytes()
        parts.append(f"<h3>{html.escape(classes[k])}</h3>" + figure(png, f"{classes[k]}: image, then each method"))
    return "".join(parts)


# ----------------------------------------------------------------------------------------------------------------------
# audit
# ----------------------------------------------------------------------------------------------------------------------


def audit_html(res: dict[str, Any], out: Path) -> str:
    from explainer.audit import AUDIT_COLUMNS

    info = res.get("settings", {})
    columns = [title for _, title in AUDIT_COLUMNS]
    rows = [[r[k] if k in ("rank", "class", "pairs") else (None if r[k] is None else 100 * r[k])
             for k, _ in AUDIT_COLUMNS] for r in res["classes"]]
    parts = [f'<p class="note">explainer {cell(info.get("checkpoint"))}, classifier {cell(info.get("classifier"))}, '
             f'data {cell(info.get("manifest"))} split {cell(info.get("split"))}: {res["n_images"]} images; '
             f'{cell(info.get("date"))}</p>',
             section("classes by reliance on context", "Percent. Excess outside: the mask's energy outside the "
                     "object minus what a uniform mask would put there (> 0: the mask avoids the object). Evidence "
                     "outside: share of images where removing the background drops the class more than removing the "
                     "object. Click a header to sort.", table(columns, rows, 1)),
             section("the images that show it most", "Image times the class's mask, the object outlined.",
                     file_figures(out, res.get("figures", [])))]
    return page("Per-class audit", parts)
