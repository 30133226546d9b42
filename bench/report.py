"""Summaries, goals, the markdown table and the plots of the benchmark suite.

Cells are the median over the runs with the spread (min-max); ratios are computed per
run from the same run's values (s3cache's run i against nginx's run i) and summarised
the same way. Goals are reported PASS or MISS; nothing here asserts.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.scenarios import Metric

TARGET_ORDER = ("direct", "s3cache", "nginx", "rclone")


@dataclass(frozen=True)
class Summary:
    median: float
    low: float
    high: float
    runs: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Summary | None:
        good = [v for v in values if not math.isnan(v)]
        if not good:
            return None
        return cls(statistics.median(good), min(good), max(good), len(good))

    def text(self, unit: str = "", *, count: bool = False) -> str:
        number = _count if count else _number
        middle = number(self.median)
        if self.runs > 1 and number(self.low) != number(self.high):
            return f"{middle}{unit} ({number(self.low)}–{number(self.high)})"
        return f"{middle}{unit}"


def _count(value: float) -> str:
    return f"{value:,.0f}"


def _number(value: float) -> str:
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:,.0f}"
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def paired(metric: Metric, a: str, b: str, combine: Callable[[float, float], float]) -> list[float]:
    """combine(a_i, b_i) for each run i where both have a value."""
    first, second = metric.values.get(a, []), metric.values.get(b, [])
    return [
        combine(x, y)
        for x, y in zip(first, second, strict=False)
        if not (math.isnan(x) or math.isnan(y)) and y != 0
    ]


def ratio(metric: Metric, a: str, b: str) -> Summary | None:
    return Summary.of(paired(metric, a, b, lambda x, y: x / y))


# --- goals -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Goal:
    metric: str
    text: str
    check: Callable[[Metric], tuple[str, str]]  # -> (PASS | MISS | n/a, what was compared)


def _ratio_at_least(other: str, floor: float) -> Callable[[Metric], tuple[str, str]]:
    def check(metric: Metric) -> tuple[str, str]:
        found = ratio(metric, "s3cache", other)
        if found is None:
            return "n/a", f"no paired s3cache/{other} runs"
        verdict = "PASS" if found.median >= floor else "MISS"
        return verdict, f"s3cache/{other} {found.text('×')}"

    return check


def _ttfb_within(other: str, slack_ms: float) -> Callable[[Metric], tuple[str, str]]:
    def check(metric: Metric) -> tuple[str, str]:
        found = Summary.of(paired(metric, "s3cache", other, lambda x, y: x - y))
        if found is None:
            return "n/a", f"no paired s3cache/{other} runs"
        verdict = "PASS" if found.median <= slack_ms else "MISS"
        return verdict, f"s3cache − {other} {found.text(' ms')}"

    return check


def _at_most(limit: float, *, strict: bool) -> Callable[[Metric], tuple[str, str]]:
    def check(metric: Metric) -> tuple[str, str]:
        values = [v for v in metric.values.get("s3cache", []) if not math.isnan(v)]
        if not values:
            return "n/a", "no s3cache runs"
        worst = max(values)
        ok = worst < limit if strict else worst <= limit
        return ("PASS" if ok else "MISS"), f"worst run {_number(worst)}{metric.unit}"

    return check


GOALS = (
    Goal("a1", "≥ 1.0× nginx", _ratio_at_least("nginx", 1.0)),
    Goal("a16", "≥ 1.0× nginx", _ratio_at_least("nginx", 1.0)),
    Goal("b_rate", "≥ 0.5× nginx", _ratio_at_least("nginx", 0.5)),
    Goal("d_speed", "≥ 4× one direct stream", _ratio_at_least("direct", 4.0)),
    Goal("d_ttfb", "≤ direct + 5 ms", _ttfb_within("direct", 5.0)),
    Goal("d_ttfb_small", "≤ direct + 5 ms", _ttfb_within("direct", 5.0)),
    Goal("e_ratio", "1.00× object bytes", _at_most(1.005, strict=False)),
    Goal("f_hwm", "< 300 MiB", _at_most(300.0, strict=True)),
)


def evaluate(metrics: Sequence[Metric]) -> list[dict[str, str]]:
    by_key = {m.key: m for m in metrics}
    results = []
    for goal in GOALS:
        metric = by_key.get(goal.metric)
        if metric is None:
            continue
        verdict, detail = goal.check(metric)
        results.append(
            {
                "metric": goal.metric,
                "title": metric.title,
                "goal": goal.text,
                "verdict": verdict,
                "measured": detail,
            }
        )
    return results


# --- the table -----------------------------------------------------------------------------


def _comparisons(metric: Metric) -> str:
    if metric.key.startswith("e_") or "s3cache" not in metric.values:
        return ""
    others = ["direct"] if metric.scenario == "d" else []
    others += ["nginx", "rclone"]
    parts = []
    for other in others:
        found = ratio(metric, "s3cache", other)
        if found is not None:
            parts.append(f"/{other} {found.text('×')}")
    return "; ".join(parts)


def table(metrics: Sequence[Metric], goals: Sequence[dict[str, str]]) -> str:
    targets = [t for t in TARGET_ORDER if any(t in m.values for m in metrics)]
    verdicts = {g["metric"]: f"{g['goal']}: **{g['verdict']}**" for g in goals}
    header = ["", "metric", "unit", *targets, "s3cache ÷ (same run)", "goal"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for metric in metrics:
        cells = []
        for target in targets:
            summary = Summary.of(metric.values.get(target, []))
            cells.append(summary.text(count=metric.unit == "streams") if summary else "—")
        row = [metric.scenario, metric.title, metric.unit, *cells, _comparisons(metric)]
        row.append(verdicts.get(metric.key, ""))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def notes_text(metrics: Sequence[Metric]) -> list[str]:
    lines: list[str] = []
    for metric in metrics:
        lines.extend(f"{metric.key}: {note}" for note in metric.notes)
    return lines


# --- plots -------------------------------------------------------------------------------------


def plot(metrics: Sequence[Metric], out_dir: Path, prefix: str) -> list[Path]:
    """One PNG per scenario: a bar per target (median) with the min-max spread."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib)")
        return []
    for stale in out_dir.glob(f"{prefix}_*.png"):  # of an earlier run's other scenarios
        stale.unlink()
    colours = {"direct": "#888888", "s3cache": "#1f77b4", "nginx": "#2ca02c", "rclone": "#d62728"}
    written = []
    for scenario in sorted({m.scenario for m in metrics}):
        group = [m for m in metrics if m.scenario == scenario and m.values]
        if not group:
            continue
        figure, axes = plt.subplots(1, len(group), figsize=(4.2 * len(group), 3.8), squeeze=False)
        for axis, metric in zip(axes[0], group, strict=True):
            _bars(axis, metric, colours)
        figure.tight_layout()
        path = out_dir / f"{prefix}_{scenario}.png"
        figure.savefig(path, dpi=110)
        plt.close(figure)
        written.append(path)
    return written


def _bars(axis: Any, metric: Metric, colours: dict[str, str]) -> None:
    names, medians, below, above = [], [], [], []
    for target in TARGET_ORDER:
        summary = Summary.of(metric.values.get(target, []))
        if summary is None:
            continue
        names.append(target)
        medians.append(summary.median)
        below.append(summary.median - summary.low)
        above.append(summary.high - summary.median)
    axis.bar(
        names,
        medians,
        yerr=[below, above],
        capsize=4,
        color=[colours.get(n, "#999999") for n in names],
    )
    for x, value in enumerate(medians):
        axis.annotate(_number(value), (x, value), ha="center", va="bottom", fontsize=8)
    better = "higher" if metric.higher_is_better else "lower"
    axis.set_title(_wrap(metric.title), fontsize=8)
    axis.set_ylabel(f"{metric.unit} ({better} is better)", fontsize=8)
    axis.tick_params(labelsize=8)


def _wrap(text: str, width: int = 48) -> str:
    lines: list[str] = []
    line = ""
    words = text.split()
    for word in words:
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    lines.append(line)
    return "\n".join(lines)


def jsonable(value: Any) -> Any:
    """NaN (a failed run) becomes null: strict JSON has no NaN."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


def load_metrics(results: Path) -> list[Metric]:
    """The metrics of a saved ``suite.json`` (null, a failed run, back to NaN)."""
    import json

    saved = json.loads(results.read_text())["metrics"]
    metrics = []
    for fields in saved:
        values = {
            target: [math.nan if v is None else float(v) for v in column]
            for target, column in fields["values"].items()
        }
        metrics.append(Metric(**{**fields, "values": values}))
    return metrics


def main() -> None:
    """Draw the plots of a saved run again, e.g. into the folder the README shows:
    ``python -m bench.report bench/results/suite.json bench/plots``."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("results", type=Path)
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for path in plot(load_metrics(args.results), args.out_dir, "suite"):
        print(path)


if __name__ == "__main__":
    main()
