"""The run report: ``report.html`` (self-contained: CSS inline, plots as base64 PNG) and ``plots/*.png``.

It answers "did it work?" at a glance: the summary, loss and eval-loss curves, learning rate,
throughput, sample generations from held-out prompts before and after training, the data
statistics, the plugins and library versions, and the resolved config.
"""

from __future__ import annotations

import base64
import html
import io
import json
import platform
import time
from pathlib import Path
from typing import Any

import yaml

from ftcore import runfolder
from ftcore.data.audit import describe
from ftcore.files import write_text_atomic
from ftcore.reporting.summary import summary_rows
from ftcore.version import __version__

LIBRARIES = ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "bitsandbytes", "deepspeed")


# -- plots --------------------------------------------------------------------------------

def _figure(title: str, ylabel: str) -> tuple[Any, Any]:
    from matplotlib.figure import Figure  # no pyplot: no global backend, safe inside applications

    fig = Figure(figsize=(6.4, 3.6), dpi=100, layout="tight")
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    return fig, ax


def _png(fig: Any) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    buf = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buf)
    return buf.getvalue()


def plot_series(rows: list[dict[str, Any]]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """What each plot draws, by plot name and line label: ``(step, value)`` points from metrics.jsonl rows."""
    return {
        "loss": {"train loss": [(r["step"], r["loss"]) for r in rows if "loss" in r],
                 "eval loss": [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]},
        "learning_rate": {"learning rate": [(r["step"], r["learning_rate"]) for r in rows if "learning_rate" in r]},
        "throughput": {"tokens / s": [(r["step"], r["tokens_per_s"]) for r in rows
                                      if "loss" in r and r.get("tokens_per_s")]},
        "rewards": {f"{prefix}{name}": [(r["step"], r[f"{prefix}rewards/{name}"]) for r in rows
                                        if f"{prefix}rewards/{name}" in r]
                    for prefix in ("", "eval_") for name in ("chosen", "rejected", "margins")},
        "reward_accuracy": {f"{prefix}accuracy": [(r["step"], r[f"{prefix}rewards/accuracies"]) for r in rows
                                                  if f"{prefix}rewards/accuracies" in r] for prefix in ("", "eval_")},
    }


def loss_plot(rows: list[dict[str, Any]]) -> bytes:
    """The loss curve (train and eval loss by step) as PNG bytes; the model card shows it too."""
    fig, ax = _figure("Loss", "loss")
    series = plot_series(rows)["loss"]
    train, evals = series["train loss"], series["eval loss"]
    if train:
        ax.plot(*zip(*train), label="train loss", color="#1f77b4")
    if evals:
        ax.plot(*zip(*evals), label="eval loss", color="#d62728", marker="o")
    if train or evals:
        ax.legend()
    return _png(fig)


def make_plots(rows: list[dict[str, Any]]) -> dict[str, bytes]:
    """PNG bytes by name: loss (train and eval), learning_rate, throughput; rewards and reward_accuracy when a
    preference objective logged them."""
    series = plot_series(rows)
    plots: dict[str, bytes] = {"loss": loss_plot(rows)}

    fig, ax = _figure("Learning rate", "learning rate")
    lrs = series["learning_rate"]["learning rate"]
    if lrs:
        ax.plot(*zip(*lrs), color="#2ca02c")
        ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    plots["learning_rate"] = _png(fig)

    fig, ax = _figure("Throughput", "tokens / s")
    speed = series["throughput"]["tokens / s"]
    if speed:
        ax.plot(*zip(*speed), color="#9467bd")
    plots["throughput"] = _png(fig)

    # a preference objective's rewards (TRL's metrics): chosen, rejected and their margin; the pairs ranked right
    for name, title, ylabel in (("rewards", "Rewards (preference)", "reward"),
                                ("reward_accuracy", "Reward accuracy (preference)", "share of pairs ranked right")):
        lines = {label: points for label, points in series[name].items() if points}
        if not lines:
            continue
        fig, ax = _figure(title, ylabel)
        for label, points in lines.items():
            ax.plot(*zip(*points), label=label.replace("eval_", "eval ").replace("_", " "),
                    marker="o" if label.startswith("eval_") else None)
        ax.legend()
        plots[name] = _png(fig)
    return plots


# -- the page -------------------------------------------------------------------------------

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#222}h1{font-size:1.6em}h2{font-size:1.2em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.8em}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ddd;padding:.3em .6em;text-align:left;
vertical-align:top}th{background:#f5f5f5}pre{background:#f7f7f7;padding:1em;overflow:auto;font-size:.85em}
.plots img{max-width:100%;height:auto}.sample{white-space:pre-wrap;font-family:ui-monospace,monospace;font-size:.85em}
.verdict{padding:.6em 1em;border-radius:4px;background:#eef6ee}.verdict.warn{background:#fff4e0}
"""


def _table(rows: list[tuple[str, Any]], header: tuple[str, ...] | None = None) -> str:
    head = "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table>{head}{body}</table>"


def verdict(metrics: dict[str, Any], warnings: list[str]) -> tuple[str, bool]:
    """One sentence: did the loss go down, did the model overfit."""
    start, end = metrics.get("eval_loss_start"), metrics.get("eval_loss")
    if start is not None and end is not None:
        if end < start:
            text, ok = f"Eval loss fell from {start:.4f} to {end:.4f} ({(start - end) / start:.1%} lower).", True
        else:
            text, ok = f"Eval loss did not improve ({start:.4f} -> {end:.4f}).", False
    elif metrics.get("train_loss") is not None:
        text, ok = f"Train loss ended at {metrics['train_loss']:.4f} (no evaluation set).", True
    else:
        text, ok = "No loss was logged.", False
    if any("overfitting" in w for w in warnings):
        text += " The run warned about overfitting (see below)."
        ok = False
    return text, ok


def versions() -> list[tuple[str, str]]:
    from importlib import metadata

    rows = [("python", platform.python_version()), ("ftcore", __version__)]
    for name in LIBRARIES:
        try:
            rows.append((name, metadata.version(name)))
        except metadata.PackageNotFoundError:
            continue
    return rows


def render_html(result: Any, config: dict[str, Any], plots: dict[str, bytes], samples: dict[str, Any],
                warnings: list[str]) -> str:
    esc = html.escape
    text, ok = verdict(result.metrics, warnings)
    parts = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>ftcore run report: "
             f"{esc(result.output_dir.name)}</title><style>{CSS}</style></head><body>",
             f"<h1>ftcore run report: {esc(result.output_dir.name)}</h1>",
             f"<p class=\"verdict{'' if ok else ' warn'}\">{esc(text)}</p>",
             f"<p>Written {esc(time.strftime('%Y-%m-%d %H:%M:%S'))} in <code>{esc(str(result.output_dir))}</code>.</p>",
             "<h2 id=\"summary\">Summary</h2>", _table(summary_rows(result))]
    failures = list(getattr(result, "export_errors", None) or [])
    if failures:
        parts += ["<h2 id=\"export-errors\">Export failed</h2><p>Training finished and its outputs are saved; "
                  "these exporters failed (rerun them with <code>ftcore export</code>):</p><ul>"]
        parts += [f"<li class=\"export-error\">{esc(f)}</li>" for f in failures] + ["</ul>"]
    details = getattr(result, "export_details", None) or {}
    if details:
        parts.append("<h2 id=\"exports\">Exports</h2>")
        for name, info in details.items():
            rows = [(k, v if isinstance(v, (str, int, float, bool)) or v is None else json.dumps(v, default=str))
                    for k, v in info.items()]
            parts += [f"<h3>{esc(name)}</h3>", _table(rows, ("check", "value"))]
    if warnings:
        parts += ["<h2 id=\"warnings\">Warnings</h2><ul>"] + [f"<li>{esc(w)}</li>" for w in warnings] + ["</ul>"]
    parts.append("<h2 id=\"curves\">Curves</h2><div class=\"plots\">")
    for name, title in (("loss", "Train and eval loss"), ("learning_rate", "Learning rate"),
                        ("throughput", "Throughput"), ("rewards", "Rewards of chosen and rejected answers"),
                        ("reward_accuracy", "Reward accuracy")):
        if name in plots:
            data = base64.b64encode(plots[name]).decode("ascii")
            parts.append(f"<figure><img id=\"plot-{name}\" alt=\"{esc(title)}\" src=\"data:image/png;base64,{data}\">"
                         f"<figcaption>{esc(title)} (plots/{name}.png)</figcaption></figure>")
    parts.append("</div>")
    rows = sample_rows(samples)
    if rows:
        where = "held-out prompts" if samples.get("held_out") else "training prompts (the run had no held-out set)"
        parts.append(f"<h2 id=\"samples\">Samples</h2><p>Greedy generations from {esc(where)}, "
                     f"before and after training.</p><table><tr><th>prompt</th><th>expected</th>"
                     f"<th>before training</th><th>after training</th></tr>")
        for row in rows:
            cells = [row["prompt"], row["reference"], "-" if row["before"] is None else row["before"],
                     "-" if row["after"] is None else row["after"]]
            parts.append("<tr class=\"sample-row\">" + "".join(f"<td class=\"sample\">{esc(c)}</td>" for c in cells)
                         + "</tr>")
        parts.append("</table>")
    data_stats = result.data_stats or {}
    stats = {k: v for k, v in data_stats.items() if k not in ("per_dataset", "per_dataset_records", "mixture",
                                                                 "audit")}
    parts += ["<h2 id=\"data\">Data</h2>", _table(list(stats.items()), ("statistic", "value"))]
    mixture = data_stats.get("mixture") or []
    per = data_stats.get("per_dataset") or {}
    if mixture:
        parts.append(_table([(m["path"], m.get("format") or "-", f"{m['weight']:g}", m.get("max_records") or "-",
                              m["records"], m["examples"], m["train_examples"], f"{m['token_share']:.1%}")
                             for m in mixture],
                            ("dataset", "format", "weight", "max records", "records read", "examples kept",
                             "training examples (sampled)", "share of training tokens")))
    elif per:
        parts.append(_table(list(per.items()), ("dataset", "examples")))
    parts += _audit_html(data_stats.get("audit") or {})
    parts += ["<h2 id=\"plugins\">Plugins and versions</h2>",
              _table([(p["name"], p["kind"], p.get("distribution") or "-", p.get("version") or "-")
                      for p in result.plugins], ("plugin", "kind", "package", "version")),
              _table(versions(), ("library", "version")),
              "<h2 id=\"config\">Resolved configuration</h2>",
              f"<pre id=\"config-yaml\">{esc(yaml.safe_dump(config, sort_keys=False))}</pre>",
              "</body></html>\n"]
    return "\n".join(parts)


def _audit_html(audit: dict[str, Any]) -> list[str]:
    """The data-quality audit: each finding with its count and first lines, then the distributions."""
    if not audit:
        return []
    esc = html.escape
    found = describe(audit)
    parts = ["<h3 id=\"data-audit\">Data audit</h3>",
             f"<p>{audit.get('examples', 0)} examples checked: "
             + (esc(f"{len(found)} kinds of findings.") if found else "no problems found.") + "</p>"]
    if found:
        parts.append(_table([(label, count, "; ".join(lines)) for label, count, lines in found],
                            ("check", "count", "first lines")))
    rows = []
    if audit.get("length"):
        q = audit["length"]
        rows.append(("length in tokens", f"{q['min']:g} / {q['q1']:g} / {q['median']:g} / {q['q3']:g} / "
                                         f"{q['max']:g} (outliers above {audit.get('length_outlier_above')})"))
    if audit.get("supervised_share"):
        q = audit["supervised_share"]
        rows.append(("supervised share per example", " / ".join(f"{q[k]:.1%}" for k in
                                                               ("min", "q1", "median", "q3", "max"))))
    if rows:
        parts.append(_table(rows, ("distribution", "min / q1 / median / q3 / max")))
    return parts


def sample_rows(samples: dict[str, Any]) -> list[dict[str, Any]]:
    """The before/after samples (``training.callbacks.SamplesCallback``'s store) as one record per prompt:
    prompt, reference, held_out, and the greedy answers before and after training (None where not generated).
    The report's table and summary.json's ``samples`` both show these."""
    before, after = samples.get("before") or [], samples.get("after") or []
    return [{"prompt": p["prompt"], "reference": p["reference"], "held_out": bool(samples.get("held_out")),
             "before": before[i] if i < len(before) else None, "after": after[i] if i < len(after) else None}
            for i, p in enumerate(samples.get("prompts") or [])]


def write_report(result: Any, config: dict[str, Any], samples: dict[str, Any], warnings: list[str]) -> Path:
    """Write plots/*.png and report.html into the run's output directory; return the HTML path.

    ``samples``: the before/after generations (``training.callbacks.SamplesCallback``);
    ``warnings``: the run's warning lines. Export failures (``result.export_errors``) are shown too.
    """
    out = result.output_dir
    plots = make_plots(runfolder.read_metrics(out))
    folder = out / runfolder.PLOTS
    folder.mkdir(exist_ok=True)
    for name, png in plots.items():
        tmp = folder / f".{name}.png.tmp"
        tmp.write_bytes(png)
        tmp.replace(folder / f"{name}.png")
    page = render_html(result, config, plots, samples, warnings)
    return write_text_atomic(out / runfolder.REPORT, page)
