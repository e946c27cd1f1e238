"""The hub-push exporter against a local Hub with the real huggingface_hub client: creating the repository,
what is uploaded, branches, no empty commits, the large-file (LFS) path, and failures that keep the run."""

from __future__ import annotations

import json
import socket

import pytest
from click.testing import CliRunner
from hub_server import TOKEN

import ftcore
from ftcore.cli import main
from ftcore.testing import finished_run, run_exporter

ADAPTER_FILES = ["README.md", "adapter_config.json", "adapter_model.safetensors", "tokenizer.json",
                 "tokenizer_config.json", "training_loss.png"]


@pytest.fixture
def run_dir(tmp_path, tiny_model_dir):
    return finished_run(tmp_path / "finished", model=tiny_model_dir)


@pytest.fixture
def token(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    return TOKEN


def pushed(hub, repo_id, revision="main"):
    return sorted(p for p in hub.head(repo_id, revision).files if p != ".gitattributes")


def test_a_finished_run_is_pushed_to_a_new_private_repository_with_its_card(hub, run_dir, token):
    lines = []
    run_exporter("hub-push", run_dir, settings={"hub-push": {"repo_id": "alice/tiny-adapter"}}, log=lines.append)
    repo = hub.repos[("model", "alice/tiny-adapter")]
    assert repo.private                                           # private unless asked otherwise
    assert pushed(hub, "alice/tiny-adapter") == ADAPTER_FILES
    head = hub.head("alice/tiny-adapter")
    assert head.message == "ftcore run run"                       # names the run (its folder)
    for name in ADAPTER_FILES:                                    # what was pushed is the run's adapter folder
        assert hub.file("alice/tiny-adapter", name) == (run_dir / "adapter" / name).read_bytes(), name
    card = hub.file("alice/tiny-adapter", "README.md").decode()
    assert "library_name: peft" in card and "- ftcore" in card and "![Training and evaluation loss by step]" \
        "(training_loss.png)" in card and 'PeftModel.from_pretrained(base, "alice/tiny-adapter")' in card
    details = json.loads((run_dir / "summary.json").read_text())["export_details"]["hub-push"]
    assert details["commit"] == head.oid and details["new_commit"] and details["branch"] == "main"
    assert f"hub-push: pushed 6 files to {hub.url}/alice/tiny-adapter (main, commit {head.oid[:12]})" in lines
    assert TOKEN not in "".join(p.read_text(errors="replace") for p in run_dir.rglob("*") if p.is_file())


def test_a_push_with_nothing_changed_makes_no_new_commit(hub, run_dir, token):
    settings = {"hub-push": {"repo_id": "alice/tiny-adapter"}}
    run_exporter("hub-push", run_dir, settings=settings)
    commits = len(hub.repos[("model", "alice/tiny-adapter")].commits)
    head = hub.head("alice/tiny-adapter").oid
    lines = []
    run_exporter("hub-push", run_dir, settings=settings, log=lines.append)
    assert hub.head("alice/tiny-adapter").oid == head and len(hub.repos[("model", "alice/tiny-adapter")].commits) \
        == commits
    assert any("already holds these files: no new commit" in line for line in lines)
    assert not json.loads((run_dir / "summary.json").read_text())["export_details"]["hub-push"]["new_commit"]


def test_a_branch_a_public_repository_and_a_commit_message_on_request(hub, run_dir, token):
    run_exporter("hub-push", run_dir, settings={"hub-push": {"repo_id": "acme/tiny-adapter", "branch": "v1",
                                                             "private": False, "commit_message": "first try"}})
    assert not hub.repos[("model", "acme/tiny-adapter")].private
    assert hub.head("acme/tiny-adapter", "v1").message == "first try"
    assert pushed(hub, "acme/tiny-adapter", "v1") == ADAPTER_FILES
    assert pushed(hub, "acme/tiny-adapter", "main") == []         # the branch was made from main, main is untouched


def test_large_files_go_through_the_lfs_batch_api(hub, run_dir, token, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)    # as HF_HUB_DISABLE_XET=1: the legacy LFS path
    hub.lfs_threshold = 10_000                                    # the weights (and the loss plot) are "large"
    run_exporter("hub-push", run_dir, settings={"hub-push": {"repo_id": "alice/tiny-adapter"}})
    weights = hub.head("alice/tiny-adapter").files["adapter_model.safetensors"]
    assert weights.lfs
    puts = [r["path"] for r in hub.requests if r["method"] == "PUT"]
    assert f"/lfs-upload/{weights.sha256}" in puts
    assert any(r["path"] == "/alice/tiny-adapter.git/info/lfs/objects/batch" for r in hub.requests)
    assert hub.file("alice/tiny-adapter", "adapter_model.safetensors") == \
        (run_dir / "adapter" / "adapter_model.safetensors").read_bytes()

    from huggingface_hub import hf_hub_download

    downloaded = hf_hub_download("alice/tiny-adapter", "adapter_model.safetensors")   # back through the CDN redirect
    assert open(downloaded, "rb").read() == (run_dir / "adapter" / "adapter_model.safetensors").read_bytes()


def export_cli(run_dir, repo_id):
    return CliRunner().invoke(main, ["export", "--model", str(run_dir), "--plugins", "hub-push",
                                     "--set", f"hub-push.repo_id={repo_id}"])


def weights_and_summary(run_dir):
    return {p: (run_dir / p).read_bytes() for p in ("adapter/adapter_model.safetensors", "summary.json",
                                                     "config.yaml", "metrics.jsonl")}


def test_a_refused_push_keeps_the_run_and_says_how_to_retry(hub, run_dir, token):
    before = weights_and_summary(run_dir)
    hub.refuse_commits = (413, "Repository storage limit reached (quota exceeded)")
    result = export_cli(run_dir, "alice/tiny-adapter")
    assert result.exit_code == 2, result.output
    assert "hub-push: could not push to alice/tiny-adapter: the Hub answered 413: Repository storage limit " \
           "reached (quota exceeded)." in result.output
    assert f"The run is intact in {run_dir}; push it again with: ftcore export --model {run_dir} --plugins " \
           f"hub-push --set hub-push.repo_id=alice/tiny-adapter" in result.output
    assert weights_and_summary(run_dir) == before and "Traceback" not in result.output

    hub.refuse_commits = None                                     # the advice works
    assert export_cli(run_dir, "alice/tiny-adapter").exit_code == 0
    assert pushed(hub, "alice/tiny-adapter") == ADAPTER_FILES


def test_a_hub_that_cannot_be_reached_keeps_the_run_and_says_how_to_retry(hub, run_dir, token,
                                                                                     monkeypatch):
    from hub_server import patch_client

    before = weights_and_summary(run_dir)
    with socket.socket() as closed:                 # a port nothing listens on: the connection is refused
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    patch_client(monkeypatch, f"http://127.0.0.1:{port}", hub.home)
    result = export_cli(run_dir, "alice/tiny-adapter")
    assert result.exit_code == 2, result.output
    assert f"hub-push: could not push to alice/tiny-adapter: the Hub (http://127.0.0.1:{port}) could not be " \
           f"reached" in result.output
    assert f"The run is intact in {run_dir}; push it again with: ftcore export --model {run_dir}" in result.output
    assert weights_and_summary(run_dir) == before and "Traceback" not in result.output and TOKEN not in result.output
    patch_client(monkeypatch, hub.url, hub.home)    # reachable again: the advice works
    assert export_cli(run_dir, "alice/tiny-adapter").exit_code == 0
    assert pushed(hub, "alice/tiny-adapter") == ADAPTER_FILES


def test_a_bad_token_or_no_write_access_is_a_clear_error_without_the_token(hub, run_dir, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_revoked_secret_value")
    result = export_cli(run_dir, "alice/tiny-adapter")
    assert result.exit_code == 2 and "refused the token" in result.output
    assert "hf_revoked_secret_value" not in result.output

    hub.add_user("bob", "hf_bob_token")
    monkeypatch.setenv("HF_TOKEN", "hf_bob_token")
    result = export_cli(run_dir, "acme/tiny-adapter")              # bob is not in acme
    assert result.exit_code == 2 and "no write access" in result.output
    assert ("model", "acme/tiny-adapter") not in hub.repos


def test_a_run_with_hub_push_stops_before_training_without_a_good_token_or_offline(hub, tiny_model_dir,
                                                                                    alpaca_file, tmp_path,
                                                                                    monkeypatch):
    from conftest import tiny_config

    config = {**tiny_config(tiny_model_dir, alpaca_file, tmp_path / "out"), "plugins": ["lora", "alpaca", "hub-push"],
              "hub-push": {"repo_id": "alice/x"}}
    with pytest.raises(ftcore.ConfigError, match="needs a Hugging Face token with write access to alice/x: run "
                                                 "`hf auth login`, or set HF_TOKEN. Nothing was trained."):
        ftcore.run(config, log=lambda m: None)
    with pytest.raises(ftcore.ConfigError, match="hub-push needs the repository to push to"):
        ftcore.run({**config, "hub-push": {}}, log=lambda m: None)
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_valid_token")
    with pytest.raises(ftcore.ConfigError, match="refused the token .* Nothing was trained"):
        ftcore.run(config, log=lambda m: None)
    hub.go_offline()
    with pytest.raises(ftcore.ConfigError, match="cannot push with HF_HUB_OFFLINE set"):
        ftcore.run(config, log=lambda m: None)
    assert not (tmp_path / "out").exists()


def test_repo_id_must_name_a_namespace(hub, run_dir, token):
    result = export_cli(run_dir, "just-a-name")
    assert result.exit_code == 2 and "hub-push.repo_id" in result.output and "namespace/name" in result.output


def test_a_full_fine_tune_is_pushed_as_a_transformers_model(hub, tmp_path, tiny_model_dir, token):
    run_dir = finished_run(tmp_path / "full", method="full", model=tiny_model_dir)
    run_exporter("hub-push", run_dir, settings={"hub-push": {"repo_id": "alice/tiny-full"}})
    files = pushed(hub, "alice/tiny-full")
    assert {"config.json", "model.safetensors", "README.md", "tokenizer.json"} <= set(files)
    card = hub.file("alice/tiny-full", "README.md").decode()
    assert "library_name: transformers" in card and 'AutoModelForCausalLM.from_pretrained("alice/tiny-full")' in card


def with_exported_gguf(run_dir):
    """The finished run as if gguf-export had written a file and its Modelfile (summary.json lists them)."""
    folder = run_dir / "gguf"
    folder.mkdir()
    (folder / "run-q8_0.gguf").write_bytes(b"GGUF stand-in: hub-push uploads it as it is")
    (folder / "Modelfile").write_text("FROM ./run-q8_0.gguf\n")
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["exports"] = [str(folder / "run-q8_0.gguf"), str(folder / "Modelfile")]
    (run_dir / "summary.json").write_text(json.dumps(summary))


def test_the_gguf_file_goes_along_unless_left_out_and_is_required_when_asked(hub, run_dir, token):
    with pytest.raises(ftcore.ConfigError, match="hub-push.gguf is true, and the run exported no GGUF file"):
        run_exporter("hub-push", run_dir, settings={"hub-push": {"repo_id": "alice/a", "gguf": True}})
    with_exported_gguf(run_dir)
    run_exporter("hub-push", run_dir, settings={"hub-push": {"repo_id": "alice/with-gguf"}})
    assert {"run-q8_0.gguf", "Modelfile"} <= set(pushed(hub, "alice/with-gguf"))
    assert "--hf-file run-q8_0.gguf" in hub.file("alice/with-gguf", "README.md").decode()
    run_exporter("hub-push", run_dir, settings={"hub-push": {"repo_id": "alice/without", "gguf": False}})
    assert pushed(hub, "alice/without") == ADAPTER_FILES
    assert "llama-cli" not in hub.file("alice/without", "README.md").decode()
