"""Pareto fronts over finished trials, their table and plots."""

from __future__ import annotations

import math
from collections.abc import Sequence


def dominates(a: Sequence[float], b: Sequence[float], modes: Sequence[str]) -> bool:
    """``a`` is at least as good as ``b`` in every objective and better in one."""
    better = False
    for x, y, mode in zip(a, b, modes):
        if mode == "min":
            x, y = -x, -y
        if x < y:
            return False
        if x > y:
            better = True
    return better


def pareto_front(rows: list[dict], metrics: Sequence[str], modes: Sequence[str]) -> list[dict]:
    """Rows no other row dominates (rows lacking an objective are left out)."""
    complete = [r for r in rows if all(isinstance(r.get(m), (int, float)) and math.isfinite(r[m]) for m in metrics)]
    front = []
    for row in complete:
        point = [row[m] for m in metrics]
        if not any(dominates([other[m] for m in metrics], point, modes) for other in complete if other is not row):
            front.append(row)
    return sorted(front, key=lambda r: r[metrics[0]], reverse=modes[0] == "max")


def format_table(rows: list[dict], columns: Sequence[str]) -> str:
    def cell(value) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    body = [[cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(b[i]) for b in body)) if body else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(b, widths)) for b in body]
    return "\n".join(lines)


def pareto_plot(rows: list[dict], front: list[dict], x: str, y: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5.5, 4))
    axis.scatter([r[x] for r in rows if x in r and y in r], [r[y] for r in rows if x in r and y in r],
                 color="#999999", label="trials")
    ordered = sorted(front, key=lambda r: r[x])
    axis.plot([r[x] for r in ordered], [r[y] for r in ordered], "o-", color="#c44e52", label="Pareto front")
    for r in ordered:
        axis.annotate(r.get("algorithm", ""), (r[x], r[y]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    axis.set_xlabel(x)
    axis.set_ylabel(y)
    axis.legend()
    figure.tight_layout()
    return figure


def quality_vs_sparsity_plot(rows: list[dict], quality: str, worst: str | None = None):
    """Quality (avg and, dashed, worst language) against encoder sparsity, one line per algorithm/setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    groups: dict[str, list[dict]] = {}
    for r in rows:
        if quality in r and "encoder_sparsity" in r:
            groups.setdefault(f"{r.get('algorithm', '?')}/{r.get('setting', '?')}", []).append(r)
    for label, items in sorted(groups.items()):
        items.sort(key=lambda r: r["encoder_sparsity"])
        line, = axis.plot([r["encoder_sparsity"] for r in items], [r[quality] for r in items], "o-", label=label)
        if worst:
            axis.plot([r["encoder_sparsity"] for r in items if worst in r], [r[worst] for r in items if worst in r],
                      "x--", color=line.get_color(), alpha=0.6)
    axis.set_xlabel("encoder sparsity")
    axis.set_ylabel(quality + (" (dashed: worst language)" if worst else ""))
    axis.legend(fontsize=7)
    figure.tight_layout()
    return figure
