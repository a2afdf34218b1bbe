"""One self-contained HTML report of a results store: Pareto plots, per-layer heat maps and the table of runs.

Plots are drawn with matplotlib and inlined as SVG (text as paths), so the file needs no network, script or font
to open. The front on each Pareto plot joins the runs that no other run beats on both axes.
"""

from __future__ import annotations

import html
import io
import math
import re
import time
from pathlib import Path
from typing import Any

from lmshrink.core.atomic import atomic_write_text
from lmshrink.core.errors import LmshrinkError
from lmshrink.core.store import Store

_KIND_STYLE = {"plan": ("o", "#d62728"), "preset": ("s", "#1f77b4"), "recipe": ("^", "#2ca02c"),
               "dense": ("D", "#7f7f7f")}
# rows of the per-layer maps in a decoder block's execution order, where the names are known
_KIND_ORDER = ["q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj", "gate_proj", "up_proj", "gate_up_proj", "down_proj",
               "fc1", "fc2"]
_CSS = """body{font-family:sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:22px}h2{font-size:18px;margin-top:32px;border-bottom:1px solid #ccc}
.plots{display:flex;flex-wrap:wrap;gap:12px}.plot{border:1px solid #ddd;padding:4px;background:#fff}
table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}
th{background:#f3f3f3}td.l,th.l{text-align:left}.note{color:#555;font-size:13px}"""


def _figure(width: float = 6.0, height: float = 4.2):
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    plt.rcParams.update({"svg.fonttype": "path", "font.size": 9})
    return plt.subplots(figsize=(width, height))


def _svg(fig) -> str:
    import matplotlib.pyplot as plt

    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", bbox_inches="tight")
    plt.close(fig)
    text = buffer.getvalue()
    return text[text.index("<svg"):]


def pareto_front(points: list[tuple[float, float]], higher_x_better: bool = False) -> list[int]:
    """Indices of the points no other point beats on both axes (lower y always better; lower x unless
    ``higher_x_better``), ordered along x."""
    order = sorted(range(len(points)), key=lambda i: ((-points[i][0] if higher_x_better else points[i][0]),
                                                      points[i][1]))
    front, best = [], math.inf
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front


def _pareto_plot(runs: list[dict], x_key: str, y_key: str, x_label: str, y_label: str,
                 higher_x_better: bool = False, x_scale: float = 1.0) -> str | None:
    chosen = [r for r in runs if r["metrics"].get(x_key) is not None and r["metrics"].get(y_key) is not None]
    if not chosen:
        return None
    fig, ax = _figure()
    points = [(r["metrics"][x_key] * x_scale, r["metrics"][y_key]) for r in chosen]
    for kind, (marker, colour) in _KIND_STYLE.items():
        xs = [p[0] for p, r in zip(points, chosen) if r["kind"] == kind]
        ys = [p[1] for p, r in zip(points, chosen) if r["kind"] == kind]
        if xs:
            ax.scatter(xs, ys, marker=marker, color=colour, s=42, label=kind, zorder=3)
    for (x, y), r in zip(points, chosen):
        ax.annotate(r["name"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    front = pareto_front(points, higher_x_better)
    if len(front) > 1:
        ax.step([points[i][0] for i in front], [points[i][1] for i in front], where="post", color="#444",
                linestyle="--", linewidth=1, label="Pareto front", zorder=2)
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    if y_key.startswith("ppl") and max(p[1] for p in points) / max(min(p[1] for p in points), 1e-9) > 8:
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(f"{y_label} against {x_label}")
    return _svg(fig)


def _layer_position(name: str) -> tuple[int, str] | None:
    found = re.search(r"\.(\d+)\.(.+)$", name)
    return None if found is None else (int(found[1]), found[2])


def _grid(values: dict[str, Any]) -> tuple[list[int], list[str], dict[tuple[int, str], Any]]:
    cells = {}
    for name, value in values.items():
        position = _layer_position(name)
        if position is not None:
            cells[position] = value
    blocks = sorted({b for b, _ in cells})
    kinds = sorted({k for _, k in cells}, key=lambda k: (_KIND_ORDER.index(k.rsplit(".", 1)[-1])
                                                          if k.rsplit(".", 1)[-1] in _KIND_ORDER else 99, k))
    return blocks, kinds, cells


def _heatmap(values: dict[str, float], title: str, label: str) -> str | None:
    import numpy as np

    blocks, kinds, cells = _grid(values)
    if not cells:
        return None
    matrix = np.full((len(kinds), len(blocks)), np.nan)
    for (b, k), v in cells.items():
        if v is not None and v > 0:
            matrix[kinds.index(k), blocks.index(b)] = math.log10(v)
    fig, ax = _figure(max(4.0, 0.22 * len(blocks) + 2), 0.35 * len(kinds) + 1.4)
    image = ax.imshow(matrix, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xticks(range(len(blocks)), [str(b) for b in blocks], fontsize=7)
    ax.set_yticks(range(len(kinds)), [k.rsplit(".", 1)[-1] for k in kinds], fontsize=7)
    ax.set_xlabel("block")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label=label)
    return _svg(fig)


def _choice_map(choice: dict[str, str], title: str) -> str | None:
    import numpy as np
    from matplotlib.colors import ListedColormap

    blocks, kinds, cells = _grid(choice)
    if not cells:
        return None
    options = sorted(set(cells.values()))
    matrix = np.full((len(kinds), len(blocks)), np.nan)
    for (b, k), v in cells.items():
        matrix[kinds.index(k), blocks.index(b)] = options.index(v)
    palette = ["#4575b4", "#fdae61", "#d73027", "#91bfdb", "#1a9850", "#fee090", "#762a83", "#999999"]
    fig, ax = _figure(max(4.0, 0.22 * len(blocks) + 2), 0.35 * len(kinds) + 1.4)
    ax.imshow(matrix, aspect="auto", cmap=ListedColormap(palette[:len(options)] or ["#999999"]),
              interpolation="nearest", vmin=-0.5, vmax=len(options) - 0.5)
    ax.set_xticks(range(len(blocks)), [str(b) for b in blocks], fontsize=7)
    ax.set_yticks(range(len(kinds)), [k.rsplit(".", 1)[-1] for k in kinds], fontsize=7)
    ax.set_xlabel("block")
    ax.set_title(title)
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(color=palette[i % len(palette)], label=o) for i, o in enumerate(options)],
              fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _svg(fig)


def spearman(xs: list[float], ys: list[float]) -> float | None:
    """Spearman's rank correlation (average ranks for ties); None for fewer than 3 pairs."""
    if len(xs) < 3:
        return None

    def ranks(values):
        order = sorted(range(len(values)), key=lambda i: values[i])
        result = [0.0] * len(values)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for k in range(i, j + 1):
                result[order[k]] = (i + j) / 2 + 1
            i = j + 1
        return result

    rx, ry = ranks(xs), ranks(ys)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    num = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    den = math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    return num / den if den else None


def _proxy_kl_plot(rows: list[dict]) -> tuple[str | None, list[tuple[str, int, float | None]]]:
    measured = [r for r in rows if r.get("kl") is not None and r.get("proxy") is not None and r["proxy"] > 0]
    if not measured:
        return None, []
    fig, ax = _figure()
    stats = []
    for option in sorted({r["option"] for r in measured}):
        sel = [r for r in measured if r["option"] == option]
        ax.scatter([r["proxy"] for r in sel], [max(r["kl"], 1e-9) for r in sel], s=18, label=option)
        stats.append((option, len(sel), spearman([r["proxy"] for r in sel], [r["kl"] for r in sel])))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("proxy: output error the option adds")
    ax.set_ylabel("measured KL, only this layer changed")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("proxy against measured KL, per layer")
    return _svg(fig), stats


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if value == 0:
            return "0"
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:,.0f}"
    return html.escape(str(value))


def build_report(db: str | Path, sensitivity: str | Path | None = None, title: str = "lmshrink report") -> str:
    """The report's HTML text."""
    if not Path(db).is_file():
        raise LmshrinkError(f"results store {db} does not exist", fix="run lmshrink sweep ... --db FILE first")
    with Store(db) as store:
        runs = store.runs()
        studies = store.studies()
        study_rows = {s["study"]: store.sensitivity(s["study"]) for s in studies}
    if sensitivity:
        with Store(sensitivity) as store:
            for s in store.studies():
                studies.append(s)
                study_rows[s["study"]] = store.sensitivity(s["study"])
    done = [r for r in runs if r["status"] == "done"]
    parts = [f"<h1>{html.escape(title)}</h1>",
             f"<p class='note'>{len(done)} finished run(s) of {len(runs)} in {html.escape(str(db))}; written "
             f"{time.strftime('%Y-%m-%d %H:%M:%S')}. Lower is better on every y axis; the dashed line is the Pareto "
             "front (runs no other run beats on both axes).</p>"]
    ppl_keys = sorted({k for r in done for k in r["metrics"] if k.startswith("ppl.")})
    quality = [(k, f"perplexity {k[4:]}") for k in ppl_keys] + [("kl", "KL to the base model (nats/token)")]
    plots = []
    for key, label in quality:
        plots.append(_pareto_plot(done, "stored_bytes", key, "stored MB", label, x_scale=1e-6))
    speed_plots = [_pareto_plot(done, "decode_tokens_per_s", key, "decode tokens/s", label, higher_x_better=True)
                   for key, label in quality]
    parts.append("<h2>Quality against stored size</h2><div class='plots'>"
                 + "".join(f"<div class='plot'>{p}</div>" for p in plots if p) + "</div>")
    if any(speed_plots):
        parts.append("<h2>Quality against decode speed</h2><div class='plots'>"
                     + "".join(f"<div class='plot'>{p}</div>" for p in speed_plots if p) + "</div>")
    else:
        parts.append("<h2>Quality against decode speed</h2><p class='note'>no run was benched (lmshrink sweep "
                     "--bench measures decode tokens/s)</p>")
    plan_maps = []
    for r in done:
        plan = (r["record"] or {}).get("plan")
        if plan:
            plan_maps.append(_choice_map({l["layer"]: l["option"] for l in plan["layers"]},
                                         f"options chosen by {r['name']}"))
    if plan_maps:
        parts.append("<h2>Options chosen per layer</h2><div class='plots'>"
                     + "".join(f"<div class='plot'>{p}</div>" for p in plan_maps if p) + "</div>")
    for s in studies:
        rows = study_rows.get(s["study"], [])
        maps = []
        for option in sorted({r["option"] for r in rows}):
            values = {r["layer"]: r["proxy"] for r in rows if r["option"] == option}
            if any(v for v in values.values()):
                maps.append(_heatmap(values, f"sensitivity {option}", "log10 output error added"))
        scatter, stats = _proxy_kl_plot(rows)
        parts.append(f"<h2>Sensitivity study {html.escape(s['study'])} ({html.escape(s['model'])})</h2>")
        if scatter:
            lines = "; ".join(f"{o}: Spearman {'n/a' if c is None else f'{c:.3f}'} over {n} layers"
                              for o, n, c in stats)
            parts.append(f"<p class='note'>proxy against measured KL ranks: {lines}</p>")
            maps.insert(0, scatter)
        parts.append("<div class='plots'>" + "".join(f"<div class='plot'>{p}</div>" for p in maps if p) + "</div>")
    metric_names = sorted({k for r in runs for k in r["metrics"]},
                          key=lambda k: (not k.startswith("ppl"), k != "kl", k))
    head = "".join(f"<th>{html.escape(n)}</th>" for n in metric_names)
    body = []
    for r in runs:
        protocol = r["protocol"] or {}
        described = ", ".join(f"{k} {v}" for k, v in protocol.items() if v not in (None, [], False))
        cells = "".join(f"<td>{_fmt(r['metrics'].get(n))}</td>" for n in metric_names)
        body.append(f"<tr><td class='l'>{html.escape(r['name'])}</td><td class='l'>{r['kind']}</td>"
                    f"<td>{_fmt(r['seed'])}</td><td class='l'>{r['status']}</td>{cells}"
                    f"<td class='l'>{html.escape(described)}</td></tr>")
    parts.append("<h2>Runs</h2><table><tr><th class='l'>run</th><th class='l'>kind</th><th>seed</th>"
                 f"<th class='l'>status</th>{head}<th class='l'>protocol</th></tr>{''.join(body)}</table>")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body>{''.join(parts)}</body></html>")


def write_report(db: str | Path, output: str | Path, *, sensitivity: str | Path | None = None,
                 title: str = "lmshrink report") -> Path:
    """Write the report of ``db`` to ``output`` (atomically); returns its path."""
    return atomic_write_text(output, build_report(db, sensitivity, title))
