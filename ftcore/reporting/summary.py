"""The end-of-run summary: the table printed when a run ends (and shown in its report), and number formats."""

from __future__ import annotations

import io
from typing import Any


def fmt_number(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def fmt_duration(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def fmt_bytes(n: int | float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)  # pragma: no cover



def summary_rows(result: Any) -> list[tuple[str, str]]:
    """``(label, value)`` rows of the end-of-run table, from a RunResult."""
    m = result.metrics
    s = result.data_stats or {}
    rows = [
        ("time", fmt_duration(m.get("runtime_s"))),
        ("steps", f"{m.get('steps')}" + (f" (epoch {m['epochs']:.2f})" if isinstance(m.get("epochs"), float) else "")),
        ("tokens seen", f"{m.get('tokens', 0):,}"),
        ("supervised tokens", f"{m.get('supervised_tokens', 0):,}"),
        ("train loss (final / best)", f"{fmt_number(m.get('train_loss'))} / {fmt_number(m.get('best_train_loss'))}"),
        ("eval loss (final / best)", f"{fmt_number(m.get('eval_loss'))} / {fmt_number(m.get('best_eval_loss'))}"
         if m.get("eval_loss") is not None else "- (no evaluation set)"),
        ("packing efficiency", f"{m['packing_efficiency']:.1%}" if m.get("packing_efficiency") is not None
         else f"{s.get('packing_efficiency', 1.0):.1%}"),
        ("peak memory", peak_memory_text(m)),
    ]
    if isinstance(m.get("loss"), dict):
        rows.append(("loss", m["loss"].get("described", m["loss"].get("path"))))
    for key, label in (("rewards/margins", "reward margin"), ("rewards/accuracies", "reward accuracy")):
        where = "eval" if m.get(f"eval_{key}") is not None else "train"
        final = m.get(f"eval_{key}") if where == "eval" else m.get(key)
        if final is not None:
            start = m.get(f"eval_{key}_start") if where == "eval" else None
            rows.insert(6, (f"{label} ({where}{', start -> final' if start is not None else ''})",
                            f"{fmt_number(start)} -> {fmt_number(final)}" if start is not None else fmt_number(final)))
    if m.get("stopped_early"):
        rows.append(("early stopping", f"stopped at step {m.get('steps')}; kept the best checkpoint "
                                       f"({m.get('best_checkpoint')})"))
    for label, path in written(result):
        rows.append((label, str(path)))
    return rows


def summary_rows_dict(result: Any) -> dict[str, Any]:
    return {"table": {label: value for label, value in summary_rows(result)}}


def peak_memory_text(m: dict[str, Any]) -> str:
    parts = []
    if m.get("peak_cuda_bytes") is not None:
        parts.append(f"{fmt_bytes(m['peak_cuda_bytes'])} GPU")
    if m.get("peak_rss_bytes") is not None:
        parts.append(f"{fmt_bytes(m['peak_rss_bytes'])} RSS")
    return ", ".join(parts) or "-"


def written(result: Any) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    if result.model_dir is not None:
        out.append(("model" if result.model_dir.name == "model" else "adapter", result.model_dir))
    for p in result.exports:
        out.append(("export", p))
    report = getattr(result, "report_path", None)
    if report is not None:
        out.append(("report", report))
    if result.metrics_path is not None:
        out.append(("metrics", result.metrics_path))
    tb = result.metrics.get("tracker_dirs") or {}
    for name, path in tb.items():
        out.append((name, path))
    out.append(("output dir", result.output_dir))
    return out


def summary_table(result: Any) -> Any:
    from rich.table import Table

    table = Table(title="ftcore run summary", show_header=False, title_justify="left")
    table.add_column("what", style="bold")
    table.add_column("value", overflow="fold")
    for label, value in summary_rows(result):
        table.add_row(label, value)
    return table


def render_summary_text(result: Any, width: int = 100) -> str:
    """The summary table as plain text (no colour codes), for logs and files."""
    from rich.console import Console

    buf = io.StringIO()
    Console(file=buf, width=width, no_color=True, color_system=None, highlight=False).print(summary_table(result))
    return buf.getvalue().rstrip("\n")
