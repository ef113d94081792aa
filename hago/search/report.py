"""The search report: Markdown with SVG plots (Pareto front, per-edge bits, per-node sensitivity, latency by trial).

Plots are written as small standalone SVG files (no plotting library needed).
Where a spec declares SPARQ and no SPARQ kernel exists, the report says that
the SPARQ speed-up in the latencies is modeled from the paper, not measured.
"""
from __future__ import annotations

import html
import os


def _svg_scatter(points, highlight, xlabel, ylabel, title, w=520, h=340) -> str:
    """points: list of (x, y, color); highlight: list of (x, y) joined by a line."""
    if not points:
        return ""
    xs = [p[0] for p in points] + [p[0] for p in highlight]
    ys = [p[1] for p in points] + [p[1] for p in highlight]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    x1 = x1 if x1 > x0 else x0 + 1
    y1 = y1 if y1 > y0 else y0 + 1
    L, R, T, B = 60, 20, 30, 45

    def px(x):
        return L + (x - x0) / (x1 - x0) * (w - L - R)

    def py(y):
        return h - B - (y - y0) / (y1 - y0) * (h - T - B)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">',
           f'<rect width="{w}" height="{h}" fill="white"/>',
           f'<text x="{w / 2}" y="18" text-anchor="middle" font-size="13">{html.escape(title)}</text>',
           f'<line x1="{L}" y1="{h - B}" x2="{w - R}" y2="{h - B}" stroke="black"/>',
           f'<line x1="{L}" y1="{T}" x2="{L}" y2="{h - B}" stroke="black"/>',
           f'<text x="{(L + w - R) / 2}" y="{h - 8}" text-anchor="middle">{html.escape(xlabel)}</text>',
           f'<text x="14" y="{(T + h - B) / 2}" text-anchor="middle" transform="rotate(-90 14 {(T + h - B) / 2})">{html.escape(ylabel)}</text>']
    for i in range(5):
        xv = x0 + (x1 - x0) * i / 4
        yv = y0 + (y1 - y0) * i / 4
        out.append(f'<text x="{px(xv)}" y="{h - B + 15}" text-anchor="middle">{xv:.3g}</text>')
        out.append(f'<text x="{L - 5}" y="{py(yv) + 4}" text-anchor="end">{yv:.4g}</text>')
    for x, y, c in points:
        out.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3.5" fill="{c}" fill-opacity="0.7"/>')
    if len(highlight) > 1:
        pts = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in highlight)
        out.append(f'<polyline points="{pts}" fill="none" stroke="black" stroke-width="1.5"/>')
    out.append("</svg>")
    return "\n".join(out)


def _svg_bars(labels, values, title, ylabel, w=720, h=300) -> str:
    if not values:
        return ""
    vmax = max(max(values), 1e-12)
    L, T, B = 60, 30, 90
    bw = max(2.0, (w - L - 20) / len(values))
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="9">',
           f'<rect width="{w}" height="{h}" fill="white"/>',
           f'<text x="{w / 2}" y="18" text-anchor="middle" font-size="13">{html.escape(title)}</text>',
           f'<text x="12" y="{h / 2}" transform="rotate(-90 12 {h / 2})" text-anchor="middle" font-size="11">{html.escape(ylabel)}</text>']
    for i, (lab, v) in enumerate(zip(labels, values)):
        bh = (h - T - B) * (v / vmax)
        x = L + i * bw
        out.append(f'<rect x="{x:.1f}" y="{h - B - bh:.1f}" width="{bw * 0.8:.1f}" height="{bh:.1f}" fill="#4a7ab5"/>')
        if len(labels) <= 60:
            out.append(f'<text x="{x + bw * 0.4:.1f}" y="{h - B + 8}" transform="rotate(60 {x + bw * 0.4:.1f} {h - B + 8})">{html.escape(str(lab)[:24])}</text>')
    out.append(f'<text x="{L - 4}" y="{T + 4}" text-anchor="end">{vmax:.3g}</text>')
    out.append("</svg>")
    return "\n".join(out)


COLORS = {"fp32": "#888888", "greedy": "#d62728", "batched_greedy": "#ff7f0e", "random": "#2ca02c", "model": "#1f77b4",
          "model:seed": "#17becf"}


def _kernel_op(name: str) -> str:
    """A TVM fused kernel's leading op (``fused_conv2d_nchwc_int83_add6...`` -> ``conv2d_nchwc_int8``)."""
    import re

    base = name[len("fused_"):] if name.startswith("fused_") else name
    first = base.split("_")[0] if "conv2d" not in base else "conv2d" + ("_nchwc_int8" if "nchwc_int8" in base else "")
    return re.sub(r"\d+$", "", first) or name


def write_report(result, out_dir: str, sensitivity: dict | None = None, qgraph=None,
                 breakdown: list[dict] | None = None, breakdown_source: str = "") -> str:
    """Write ``report.md`` and its SVG plots into ``out_dir``. ``breakdown``: where the best model's time goes,
    rows ``{"node" or "kernel", "op"?, "ms"}`` from onnxruntime's profiler or the TVM VM's
    (:func:`hago.runtime.ort.profile_nodes`, :func:`hago.backend.measure.profile`)."""
    os.makedirs(out_dir, exist_ok=True)
    ok = [t for t in result.history if t.ok and t.latency_ms is not None]
    pts = [(t.latency_ms, t.accuracy * 100, COLORS.get(t.strategy, "#9467bd")) for t in ok]
    front = [(t.latency_ms, t.accuracy * 100) for t in result.pareto]
    files = {}
    sq = (getattr(result, "latency_model", None) or {}).get("sparq") or {}
    sparq_modeled = bool(sq.get("modeled"))
    n_modeled = sum(1 for t in ok if getattr(t, "modeled", ""))
    xl = "latency (ms, measured; SPARQ speed-up modeled)" if sparq_modeled and n_modeled else "latency (ms, measured)"
    files["pareto.svg"] = _svg_scatter(pts, front, xl, "accuracy (%)", "accuracy vs latency")
    if qgraph is not None:
        anns = [(v.name, a.bits) for v, a in qgraph.graph.annotated() if a.kind != "bias"]
        files["bits.svg"] = _svg_bars([n for n, _ in anns], [b for _, b in anns], "bits per edge (best)", "bits")
    if sensitivity:
        items = sorted(sensitivity.items(), key=lambda kv: -kv[1] if kv[1] == kv[1] else 0)[:60]
        files["sensitivity.svg"] = _svg_bars([k for k, _ in items], [v for _, v in items],
                                             "per-node sensitivity (output error, only that node integer)", "1/SQNR")
    if breakdown:
        top = breakdown[:40]
        files["breakdown.svg"] = _svg_bars([str(r.get("node") or r.get("kernel"))[-40:] for r in top],
                                           [r["ms"] for r in top], "latency breakdown of the best model (top kernels)",
                                           "ms per run")
    files["latency.svg"] = _svg_bars([str(t.index) for t in ok], [t.latency_ms for t in ok], "latency of each measured trial", "ms")
    for name, svg in files.items():
        if svg:
            with open(os.path.join(out_dir, name), "w") as f:
                f.write(svg)
    b = result.best
    lines = ["# hago search report", "",
             f"- model hash `{result.model_hash}`, spec `{os.path.basename(str(result.spec_name))}` (hash `{result.spec_hash}`)",
             f"- objective: {result.objective.get('name')} (max drop {result.objective.get('max_drop_points')} points"
             f"{' relative' if result.objective.get('relative') else ''})",
             f"- space: {result.space}",
             f"- trials: {len(result.history)}, measured: {len(ok)}, failed: {sum(1 for t in result.history if t.status == 'failed')}"
             + (" (interrupted)" if result.interrupted else ""),
             f"- fp32: accuracy {result.fp32_accuracy * 100:.2f}%"
             + (f", latency {result.fp32_latency_ms:.3f} ms" if result.fp32_latency_ms else ""), ""]
    if sparq_modeled:
        lines += ["## SPARQ latency is modeled, not measured", "",
                  f"**The SPARQ speed-up is modeled, not measured.** {sq.get('note', '')}.",
                  f"Modeled from: {sq.get('source', 'the SPARQ paper')}; speed-up {sq.get('speedup', 2.0)}x "
                  f"(spec `sparq.speedup`). {n_modeled} of {len(ok)} measured trials carry modeled SPARQ latency "
                  "(marked *modeled* below); their measured 8-bit latency is in the log (`measured_ms`).", ""]
    elif sq:
        lines += [f"- SPARQ: {sq.get('note', '')}", ""]
    if b is not None:
        speed = f"{result.fp32_latency_ms / b.latency_ms:.2f}x fp32" if result.fp32_latency_ms else ""
        c = b.config
        lines += ["## Best", "", f"accuracy {b.accuracy * 100:.2f}%, latency {b.latency_ms:.3f} ms ({speed})"
                  + (f" -- **modeled** SPARQ speed-up on a measured {b.measured_ms:.3f} ms"
                     if b.modeled and b.measured_ms else "")
                  + f", method `{c.method}`", "",
                  f"float nodes ({len(c.float_nodes)}): " + (", ".join(f"`{n}`" for n in sorted(c.float_nodes)) or "none"),
                  "", "edges below maximum bits: " + (", ".join(f"`{k}`={v}" for k, v in c.bits) or "none"), ""]
        for field, what in (("methods", "per-edge threshold methods"), ("signatures", "nodes on another signature"),
                            ("sparq", "SPARQ edges"), ("multipoint", "multipoint nodes (points)")):
            if getattr(c, field):
                lines += [f"{what}: " + ", ".join(f"`{k}`={v}" for k, v in getattr(c, field)), ""]
        if c.per_tensor:
            lines += ["per-tensor weights: " + ", ".join(f"`{e}`" for e in sorted(c.per_tensor)), ""]
    lines += ["## Pareto front", "", "| accuracy % | latency ms | latency source | float nodes | strategy |", "|---|---|---|---|---|"]
    for t in result.pareto:
        src = "modeled (SPARQ)" if getattr(t, "modeled", "") else "measured"
        lines.append(f"| {t.accuracy * 100:.2f} | {t.latency_ms:.3f} | {src} | {len(t.config.float_nodes)} | {t.strategy} |")
    lines += ["", "![pareto](pareto.svg)", ""]
    if breakdown:
        total = sum(r["ms"] for r in breakdown) or 1.0
        by_op: dict[str, float] = {}
        for r in breakdown:
            op = r.get("op") or _kernel_op(str(r.get("kernel", "?")))
            by_op[op] = by_op.get(op, 0.0) + r["ms"]
        lines += ["## Latency breakdown of the best model", "",
                  f"Source: {breakdown_source or 'profiler'}; sum of kernel times {total:.3f} ms per run.", "",
                  "| op | ms | share |", "|---|---|---|"]
        for op, ms in sorted(by_op.items(), key=lambda kv: -kv[1])[:15]:
            lines.append(f"| {op} | {ms:.3f} | {ms / total * 100:.1f}% |")
        lines += ["", "| top kernels | ms | share |", "|---|---|---|"]
        for r in breakdown[:10]:
            lines.append(f"| `{r.get('node') or r.get('kernel')}` | {r['ms']:.3f} | {r['ms'] / total * 100:.1f}% |")
        lines += ["", "![breakdown](breakdown.svg)", ""]
    for name in ("bits.svg", "sensitivity.svg", "latency.svg"):
        if files.get(name):
            lines += [f"![{name[:-4]}]({name})", ""]
    failed = [t for t in result.history if t.status == "failed"]
    if failed:
        lines += ["## Failed trials", ""] + [f"- trial {t.index}: {t.error}" for t in failed] + [""]
    path = os.path.join(out_dir, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path
