"""The run report: a self-contained HTML page with real PNG plots and real sample generations."""

from __future__ import annotations

import base64
import io
from html.parser import HTMLParser

import pytest
from PIL import Image
from ux_runs import metric_rows, shared_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class Page(HTMLParser):
    """Collects what the tests look at: images, links, ids, table rows by class, text by id."""

    def __init__(self) -> None:
        super().__init__()
        self.images: dict[str, str] = {}
        self.external: list[str] = []
        self.ids: set[str] = set()
        self.sample_rows: list[list[str]] = []
        self.texts: dict[str, str] = {}
        self._row: list[str] | None = None
        self._cell: list[str] | None = None
        self._capture: str | None = None
        self.tables: list[list[list[str]]] = []
        self._table: list[list[str]] | None = None
        self._table_row: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.add(a["id"])
        for key in ("src", "href"):
            value = a.get(key) or ""
            if value and not value.startswith(("data:", "#")):
                self.external.append(value)
        if tag == "img":
            self.images[a.get("id", "")] = a.get("src", "")
        if tag == "pre" and "id" in a:
            self._capture, self.texts[a["id"]] = a["id"], ""
        if tag == "table":
            self._table = []
        if tag == "tr":
            self._table_row = []
            if a.get("class") == "sample-row":
                self._row = []
        if tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            text = "".join(self._cell)
            if self._row is not None:
                self._row.append(text)
            if self._table_row is not None:
                self._table_row.append(text)
            self._cell = None
        if tag == "tr":
            if self._row is not None:
                self.sample_rows.append(self._row)
                self._row = None
            if self._table is not None and self._table_row is not None:
                self._table.append(self._table_row)
            self._table_row = None
        if tag == "table" and self._table is not None:
            self.tables.append(self._table)
            self._table = None
        if tag == "pre":
            self._capture = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)
        if self._capture:
            self.texts[self._capture] += data


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_dir):
    return shared_run(tmp_path_factory, tiny_model_dir)[0]


@pytest.fixture(scope="module")
def page(run):
    parser = Page()
    parser.feed(run.report_path.read_text(encoding="utf-8"))
    return parser


def _check_png(data: bytes) -> tuple[int, int]:
    assert data.startswith(PNG_MAGIC)
    with Image.open(io.BytesIO(data)) as img:
        img.verify()
    with Image.open(io.BytesIO(data)) as img:
        assert img.format == "PNG"
        return img.size


def test_report_is_written_into_the_output_dir(run):
    assert run.report_path == run.output_dir / "report.html"
    for name in ("loss", "learning_rate", "throughput"):
        width, height = _check_png((run.output_dir / "plots" / f"{name}.png").read_bytes())
        assert width >= 300 and height >= 200


def test_report_is_self_contained_with_inline_plots(run, page):
    assert page.external == []        # no network: no external scripts, styles or images
    assert set(page.images) == {"plot-loss", "plot-learning_rate", "plot-throughput"}
    for name, src in page.images.items():
        prefix = "data:image/png;base64,"
        assert src.startswith(prefix)
        data = base64.b64decode(src[len(prefix):], validate=True)
        _check_png(data)
        assert data == (run.output_dir / "plots" / f"{name.removeprefix('plot-')}.png").read_bytes()


def test_report_shows_config_plugins_versions_and_data(run, page):
    import transformers
    import yaml

    config = yaml.safe_load(page.texts["config-yaml"])
    assert config["training"]["report_to"] == ["tensorboard"] and config["plugins"] == ["alpaca", "lora"]
    cells = {row[0]: row[1:] for table in page.tables for row in table if row}
    assert cells["lora"][0] == "adapter" and cells["alpaca"][0] == "format"
    assert cells["transformers"] == [transformers.__version__]
    assert cells["train_examples"] == ["20"] and cells["eval_examples"] == ["4"]
    assert cells["steps"][0].startswith("10")
    assert {"summary", "curves", "samples", "data", "plugins", "config"} <= page.ids


def test_samples_are_real_generations_before_and_after_training(run, page, tiny_model_dir):
    """The 'after' column is what the saved adapter generates; 'before' what the base model generates."""
    from ftcore.models.generation import generate_ids
    from ftcore.tools.generate import load

    assert len(page.sample_rows) == 2
    base, tok = load(str(tiny_model_dir))
    trained, _ = load(str(run.output_dir))       # a run directory: its adapter, merged by the lora plugin
    for prompt, expected, before, after in page.sample_rows:
        assert prompt.startswith("### Instruction:\nAdd ") and prompt.endswith("### Response:\n")
        assert expected.strip().isdigit()
        ids = tok(prompt, add_special_tokens=True)["input_ids"]   # alpaca renders with BOS
        assert before == tok.decode(generate_ids(base, tok, ids, 6), skip_special_tokens=True)
        assert after == tok.decode(generate_ids(trained, tok, ids, 6), skip_special_tokens=True)


def test_loss_plot_draws_the_train_and_eval_loss_curves(run):
    """The loss PNG is drawn from both series of metrics.jsonl: without the eval points it is another image."""
    from ftcore.reporting.report import make_plots, plot_series

    rows = metric_rows(run)
    series = plot_series(rows)["loss"]
    assert series["train loss"] == [(r["step"], r["loss"]) for r in rows if "loss" in r] and len(series["train loss"]) == 10
    assert series["eval loss"] == [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    assert len({step for step, _ in series["eval loss"]}) >= 5       # evaluations at the start and every 2 steps
    drawn = make_plots(rows)["loss"]
    assert drawn == (run.output_dir / "plots" / "loss.png").read_bytes()
    without_eval = make_plots([{k: v for k, v in r.items() if k != "eval_loss"} for r in rows])["loss"]
    _check_png(without_eval)
    assert without_eval != drawn


def test_samples_come_from_the_held_out_prompts(run, page):
    """The report's prompts are the first held-out examples of the run's own data split, and it says so."""
    from transformers import AutoTokenizer

    import ftcore
    from ftcore.data import pipeline as data_mod
    from ftcore.training.callbacks import sample_prompts

    config, plugins = ftcore.resolve(str(run.output_dir / "config.yaml"), log=lambda m: None)
    tok = AutoTokenizer.from_pretrained(str(run.model_dir))
    prepared = data_mod.prepare(config, plugins, tok, log=lambda m: None)
    held_out = [p["prompt"] for p in sample_prompts(prepared.eval, tok, 2)]
    training = {p["prompt"] for p in sample_prompts(prepared.train, tok, len(prepared.train))}
    assert [row[0] for row in page.sample_rows] == held_out
    assert not training & set(held_out)
    assert "Greedy generations from held-out prompts" in run.report_path.read_text(encoding="utf-8")


def test_report_and_summary_carry_the_data_audit(run, page):
    import json

    from ftcore import runfolder
    from ftcore.reporting.report import _audit_html

    audit = json.loads((run.output_dir / runfolder.SUMMARY).read_text())["data_stats"]["audit"]
    assert audit["examples"] == 24 and audit["train_examples"] == 20 and audit["eval_examples"] == 4
    assert audit["findings"] == {} and set(audit["supervised_share"]) == {"min", "q1", "median", "q3", "max"}
    assert "data-audit" in page.ids
    cells = {row[0]: row[1:] for table in page.tables for row in table if row}
    assert cells["supervised share per example"][0].count("%") == 5
    findings = {"examples": 3, "findings": {"leakage_exact": {"count": 1, "lines": ["eval.jsonl:1: held out, but "
                                                                                   "also in training at a.jsonl:4"]}}}
    html = "".join(_audit_html(findings))
    assert "held-out examples also in the training data (exact)" in html and "eval.jsonl:1: held out" in html
