"""Datasets by Hub id (``data.datasets: [org/name]``) through the datasets library and a local Hub: the cache,
offline use, a revision, and the errors a user can fix."""

from __future__ import annotations

import json

import pytest
from conftest import write_jsonl

from ftcore import DataError, prepare_data

RECORDS = [{"instruction": f"Add {a} and {a + 1}.", "input": "", "output": str(2 * a + 1)} for a in range(12)]


@pytest.fixture
def facts(hub, tmp_path):
    """acme/facts on the local Hub: a dataset repository with one alpaca JSONL file."""
    folder = tmp_path / "facts"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", RECORDS)
    return hub.add_folder("acme/facts", folder, kind="dataset")


def prep(model_dir, spec, **data):
    cfg = {"model": str(model_dir), "plugins": ["alpaca"],
           "data": {"datasets": [spec], "max_length": 128, "val_size": 0, **data}}
    return prepare_data(cfg, log=lambda m: None).data


def test_a_dataset_by_id_is_fetched_once_and_then_read_offline_from_the_cache(hub, facts, tiny_model_dir):
    first = prep(tiny_model_dir, "acme/facts", cache=False)
    assert first.stats.records == len(RECORDS) and first.stats.per_dataset == {"acme/facts": len(RECORDS)}
    assert any(r["path"] == "/datasets/acme/facts/resolve/" + facts.oid + "/train.jsonl" for r in hub.requests)
    assert (hub.home / "datasets").is_dir()                       # the datasets cache, under HF_HOME

    hub.go_offline()
    hub.requests.clear()
    again = prep(tiny_model_dir, "acme/facts", cache=False)
    assert hub.requests == []
    assert sorted(again.train["input_ids"]) == sorted(first.train["input_ids"])


def test_a_dataset_revision_reads_that_commit(hub, facts, tiny_model_dir, tmp_path):
    more = tmp_path / "more"
    more.mkdir()
    write_jsonl(more / "train.jsonl", RECORDS * 2)
    hub.add_folder("acme/facts", more, kind="dataset")
    hub.repos[("dataset", "acme/facts")].tags["v1"] = facts.oid
    assert prep(tiny_model_dir, "acme/facts").stats.records == 2 * len(RECORDS)
    assert prep(tiny_model_dir, {"path": "acme/facts", "revision": "v1"}).stats.records == len(RECORDS)
    assert prep(tiny_model_dir, {"path": "acme/facts", "revision": facts.oid}).stats.records == len(RECORDS)


def test_dataset_errors_say_what_to_do(hub, facts, tiny_model_dir, tmp_path, monkeypatch):
    with pytest.raises(DataError, match=r"data path acme/nope: no local file or folder of that name, and no "
                                        r"dataset acme/nope on the Hub"):
        prep(tiny_model_dir, "acme/nope")
    with pytest.raises(DataError, match="dataset acme/facts has no revision 'v9'"):
        prep(tiny_model_dir, {"path": "acme/facts", "revision": "v9"})

    gated = tmp_path / "gated"
    gated.mkdir()
    (gated / "train.jsonl").write_text(json.dumps(RECORDS[0]) + "\n")
    hub.add_folder("acme/private-facts", gated, kind="dataset", gated="manual")
    with pytest.raises(DataError, match=f"dataset acme/private-facts is gated: accept its conditions at "
                                        f"{hub.url}/datasets/acme/private-facts .*HF_TOKEN"):
        prep(tiny_model_dir, "acme/private-facts")

    hub.go_offline()
    with pytest.raises(DataError, match="dataset acme/other is not in the datasets cache, and HF_HUB_OFFLINE is set"):
        prep(tiny_model_dir, "acme/other")
