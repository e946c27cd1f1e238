"""Models by Hub id, fetched with the real huggingface_hub client from a local Hub (tests/hub_server.py):
the cache, revisions, progress, resuming a cut download, offline use, and the errors a user can fix."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from click.testing import CliRunner
from conftest import REPO
from hub_server import TOKEN

import ftcore
from ftcore.cli import main
from ftcore.models.paths import resolve_model_path


@pytest.fixture
def tiny_repo(hub, tiny_model_dir, tmp_path):
    """acme/tiny on the local Hub: the tiny model, its card (licence), and files a run must not fetch."""
    folder = shutil.copytree(tiny_model_dir, tmp_path / "upload")
    (folder / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny\n")
    (folder / "pytorch_model.bin").write_bytes(b"pickle weights a run never fetches")
    (folder / "onnx").mkdir()
    (folder / "onnx" / "model.onnx").write_bytes(b"not needed either")
    hub.add_folder("acme/tiny", folder)
    return folder


def downloaded(hub, repo="acme/tiny"):
    """Files of the repository that were downloaded (GET on resolve or the CDN), by name."""
    head = hub.head(repo)
    by_sha = {b.sha256: p for p, b in head.files.items()}
    names = []
    for r in hub.requests:
        if r["method"] != "GET":
            continue
        if "/resolve/" in r["path"]:
            names.append(r["path"].split("/resolve/", 1)[1].split("/", 1)[1])
        elif r["path"].startswith("/cdn/"):
            names.append(by_sha.get(r["path"][5:], r["path"]))
    return names


def test_a_model_by_id_is_fetched_into_the_cache_with_progress_and_only_what_a_run_needs(hub, tiny_repo):
    lines = []
    path = resolve_model_path("acme/tiny", lines.append)
    commit = hub.head("acme/tiny").oid
    assert path == hub.home / "hub" / "models--acme--tiny" / "snapshots" / commit   # the standard cache, in HF_HOME
    assert sorted(p.name for p in path.iterdir()) == ["README.md", "config.json", "generation_config.json",
                                                      "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    assert "pytorch_model.bin" not in downloaded(hub) and "onnx/model.onnx" not in downloaded(hub)
    assert (path / "model.safetensors").read_bytes() == (tiny_repo / "model.safetensors").read_bytes()
    # config.json came first (to check it needs no remote code); the other five follow in one download
    assert any(line.startswith(f"downloading acme/tiny (commit {commit[:12]}) into the Hugging Face cache: 5 file(s)")
               for line in lines), lines
    assert any(line.startswith("downloading acme/tiny") and "100% (" in line for line in lines), lines
    assert any(line.startswith("downloaded acme/tiny") for line in lines), lines

    hub.requests.clear()
    lines.clear()
    assert resolve_model_path("acme/tiny", lines.append) == path
    assert downloaded(hub) == []                      # the cache is used: nothing is fetched twice
    assert lines == [f"base model acme/tiny (commit {commit[:12]}): in the Hugging Face cache"]


def test_a_revision_is_a_branch_a_tag_or_a_commit(hub, tiny_repo, tmp_path):
    first = hub.head("acme/tiny").oid
    changed = shutil.copytree(tiny_repo, tmp_path / "v2")
    config = json.loads((changed / "config.json").read_text())
    (changed / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-5}))
    second = hub.add_folder("acme/tiny", changed, branch="main").oid
    hub.repos[("model", "acme/tiny")].tags["v1"] = first
    eps = {}
    for revision in ("v1", first, "main"):
        path = resolve_model_path("acme/tiny", lambda m: None, revision=revision)
        eps[revision] = (path.name, json.loads((path / "config.json").read_text()).get("rms_norm_eps"))
    assert eps["v1"][0] == eps[first][0] == first and eps["main"][0] == second
    assert eps["v1"][1] != 1e-5 and eps["main"][1] == 1e-5
    assert resolve_model_path("acme/tiny@v1", lambda m: None).name == first


def test_a_download_cut_off_mid_file_resumes_from_where_it_stopped(hub, tmp_path):
    from ftcore.testing import build_model, build_tokenizer

    # huggingface_hub writes what it receives in 10 MiB chunks: a weights file of ~27 MB, cut off after 12 MiB,
    # leaves one chunk in the partial file to resume from.
    model = build_model(tmp_path / "bigger", build_tokenizer(vocab_size=512), hidden_size=512, intermediate_size=1536)
    weights = (model / "model.safetensors").read_bytes()
    hub.add_folder("acme/bigger", model)
    hub.drop_once[hub.head("acme/bigger").files["model.safetensors"].sha256] = 12 << 20
    path = resolve_model_path("acme/bigger", lambda m: None)
    assert (path / "model.safetensors").read_bytes() == weights
    cdn = [r for r in hub.requests if r["path"].startswith("/cdn/")]
    assert [r["range"] for r in cdn] == [None, f"bytes={10 << 20}-"]   # the retry asked only for what was missing
    assert not any(r["auth"] for r in cdn)           # as from the real CDN redirect: the token stays on the Hub


def test_offline_a_cached_model_is_used_without_asking_the_hub(hub, tiny_repo):
    path = resolve_model_path("acme/tiny", lambda m: None)
    hub.go_offline()
    hub.requests.clear()
    lines = []
    assert resolve_model_path("acme/tiny", lines.append) == path
    assert hub.requests == []
    assert "from the Hugging Face cache, without asking the Hub (HF_HUB_OFFLINE is set)" in lines[0]


def test_prepare_fetches_the_tokenizer_and_not_the_weights(hub, tiny_repo, alpaca_file):
    report = ftcore.prepare_data({"model": "acme/tiny", "plugins": ["alpaca"],
                                  "data": {"datasets": [str(alpaca_file)], "val_size": 0}}, log=lambda m: None)
    assert report.stats.records == 24
    assert "tokenizer.json" in downloaded(hub) and "model.safetensors" not in downloaded(hub)


def test_a_hub_that_cannot_be_reached_falls_back_to_the_cache(hub, tiny_repo, monkeypatch):
    from hub_server import patch_client

    path = resolve_model_path("acme/tiny", lambda m: None)
    patch_client(monkeypatch, "http://127.0.0.1:9", hub.home)     # nothing listens there: connection refused
    lines = []
    assert resolve_model_path("acme/tiny", lines.append) == path
    assert "from the Hugging Face cache, without asking the Hub (the Hub could not be reached)" in lines[0]
    with pytest.raises(ftcore.ConfigError, match=r"model acme/other is not in the Hugging Face cache .*, and the Hub "
                                                 r"\(http://127.0.0.1:9\) could not be reached"):
        resolve_model_path("acme/other", lambda m: None)


def test_estimate_fetches_the_config_alone(hub, tiny_repo):
    result = ftcore.estimate("acme/tiny", log=lambda m: None)
    assert result["params"] > 0
    assert downloaded(hub) == ["config.json"]


# -- errors: exit status 2, a message saying what to do, nothing written ----------------------------

def run_cli(tmp_path, alpaca_file, model, *extra):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["run", "--plugins", "lora,alpaca", "--model", model, "--data", str(alpaca_file),
                                       "--output", str(out), "--no-progress", *extra])
    assert not out.exists()                           # nothing half-written
    return result


def test_a_repository_that_does_not_exist_names_the_closest_cached_one(hub, tiny_repo, tmp_path, alpaca_file):
    resolve_model_path("acme/tiny", lambda m: None)   # now in the cache
    result = run_cli(tmp_path, alpaca_file, "acme/tinny")
    assert result.exit_code == 2, result.output
    assert "model acme/tinny: no such repository on the Hub" in result.output
    assert 'Did you mean "acme/tiny" (in the Hugging Face cache)?' in result.output
    assert "Traceback" not in result.output


def test_a_repository_that_does_not_exist_names_the_closest_local_folder(hub, tiny_repo, tmp_path, alpaca_file,
                                                                         monkeypatch):
    """A typo in a local folder's name reads as a Hub id (org/name): the folder it was meant to be is named."""
    import shutil

    work = tmp_path / "work"
    shutil.copytree(tiny_repo, work / "models" / "tiny-llama")
    monkeypatch.chdir(work)
    result = run_cli(tmp_path, alpaca_file, "models/tiny-lama")
    assert result.exit_code == 2, result.output
    assert "model models/tiny-lama: no such repository on the Hub" in result.output
    assert 'Did you mean "models/tiny-llama" (a local folder)?' in result.output
    assert "Traceback" not in result.output


def test_a_revision_that_does_not_exist(hub, tiny_repo, tmp_path, alpaca_file):
    result = run_cli(tmp_path, alpaca_file, "acme/tiny@no-such-branch")
    assert result.exit_code == 2 and "model acme/tiny has no revision 'no-such-branch'" in result.output


def test_a_gated_model_says_what_to_accept_and_how_to_give_a_token(hub, tiny_repo, tmp_path, alpaca_file,
                                                                    monkeypatch):
    hub.add_folder("acme/gated", tiny_repo, gated="manual")
    result = run_cli(tmp_path, alpaca_file, "acme/gated")
    assert result.exit_code == 2, result.output
    assert f"model acme/gated is gated: its authors ask you to accept their conditions first. Accept them at " \
           f"{hub.url}/acme/gated" in result.output and "hf auth login" in result.output and "HF_TOKEN" in result.output

    hub.add_user("bob", "hf_bob_token")
    monkeypatch.setenv("HF_TOKEN", "hf_bob_token")
    result = run_cli(tmp_path, alpaca_file, "acme/gated")
    assert result.exit_code == 2 and "your token has no access to it yet" in result.output
    assert "hf_bob_token" not in result.output
    assert not (hub.home / "hub" / "models--acme--gated" / "snapshots").exists() or \
        not any((hub.home / "hub" / "models--acme--gated" / "snapshots").rglob("*.safetensors"))

    hub.repos[("model", "acme/gated")].approved.add("bob")
    assert (resolve_model_path("acme/gated", lambda m: None) / "model.safetensors").is_file()   # HF_TOKEN is sent


def test_a_refused_token_is_an_error_and_never_shown(hub, tiny_repo, tmp_path, alpaca_file, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_expired_secret")
    result = run_cli(tmp_path, alpaca_file, "acme/tiny")
    assert result.exit_code == 2 and "refused your token" in result.output
    assert "hf_expired_secret" not in result.output


def test_offline_and_not_cached(hub, tiny_repo, tmp_path, alpaca_file):
    hub.go_offline()
    result = run_cli(tmp_path, alpaca_file, "acme/tiny")
    assert result.exit_code == 2, result.output
    assert "model acme/tiny is not in the Hugging Face cache" in result.output
    assert "HF_HUB_OFFLINE is set" in result.output and hub.requests == []


def test_a_repository_with_pickle_weights_only_is_refused_before_downloading(hub, tiny_repo, tmp_path, alpaca_file):
    pickled = shutil.copytree(tiny_repo, tmp_path / "pickled", ignore=shutil.ignore_patterns("*.safetensors"))
    hub.add_folder("acme/pickled", pickled)
    result = run_cli(tmp_path, alpaca_file, "acme/pickled")
    assert result.exit_code == 2 and "has weights only as pickle files (pytorch_model.bin)" in result.output
    assert downloaded(hub, "acme/pickled") == []


def test_a_model_that_needs_remote_code_is_refused_while_trust_remote_code_is_off(hub, tiny_repo, tmp_path,
                                                                                  alpaca_file):
    custom = shutil.copytree(tiny_repo, tmp_path / "custom")
    config = json.loads((custom / "config.json").read_text())
    config.update(model_type="evil-llama", auto_map={"AutoModelForCausalLM": "modeling_evil.EvilModel"})
    (custom / "config.json").write_text(json.dumps(config))
    (custom / "modeling_evil.py").write_text("raise SystemExit('remote code ran')\n")
    hub.add_folder("acme/custom", custom)
    result = run_cli(tmp_path, alpaca_file, "acme/custom")
    assert result.exit_code == 2, result.output
    assert "needs its own Python code" in result.output and "model.trust_remote_code" in result.output
    assert downloaded(hub, "acme/custom") == ["config.json"]     # the weights and the code were not fetched


# -- the environment a user sets ------------------------------------------------------------------

def test_the_cli_honours_hf_endpoint_hf_home_hf_token_and_hf_hub_offline_from_the_environment(hub, tiny_repo, tmp_path):
    hub.add_folder("acme/gated", tiny_repo, gated="manual")
    hub.repos[("model", "acme/gated")].approved.add("alice")
    home = tmp_path / "elsewhere"
    env = {k: v for k, v in {**os.environ, **hub.env}.items() if k not in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE")}
    env.update(HF_HOME=str(home), HF_TOKEN=TOKEN)      # HF_HOME alone: the cache is its hub/ folder
    proc = subprocess.run([sys.executable, "-m", "ftcore.cli", "estimate", "--model", "acme/gated", "--json"],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["params"] > 0
    assert (home / "hub" / "models--acme--gated").is_dir()
    assert TOKEN not in proc.stdout + proc.stderr

    hub.requests.clear()                              # HF_HUB_OFFLINE=1: the cached config, not a request
    proc = subprocess.run([sys.executable, "-m", "ftcore.cli", "estimate", "--model", "acme/gated", "--json"],
                          capture_output=True, text=True, env={**env, "HF_HUB_OFFLINE": "1"}, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert hub.requests == []
