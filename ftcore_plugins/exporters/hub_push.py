"""Exporter: publish the run to a model repository on the Hugging Face Hub (``hub-push``).

In a run (``--plugins lora,chatml,hub-push --set hub-push.repo_id=you/my-adapter``), or afterwards on a
finished run (``ftcore export --model RUN --plugins hub-push --set hub-push.repo_id=...``). It creates the
repository when it is missing (private unless ``hub-push.private: false``), writes the model card into the
folder it uploads, and uploads in one commit, named after the run, to ``hub-push.branch``: the trained
adapter (or the fully fine-tuned model), or the merged model (``hub-push.upload: merged``, after the
``merge`` exporter), with the GGUF file and its Ollama Modelfile when the run exported one. Files the
repository already holds unchanged are not sent again, and when nothing changed no commit is made.

The token is huggingface_hub's (``HF_TOKEN`` or ``hf auth login``): it is never part of the config, the
run's files or a message. A push that fails (auth, network, quota) leaves the run as it is and says how to
retry with ``ftcore export``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

import ftcore

NAME = "hub-push"
SKIPPED = {".gitattributes"}


class HubPushConfig(ftcore.PluginConfig):
    repo_id: str | None = Field(None, description="The model repository to push to, `namespace/name` (created "
                                "when missing). Required.")
    private: bool = Field(True, description="Create the repository private (an existing one keeps its visibility).")
    branch: str = Field("main", description="The branch to push to (created from main when missing).")
    upload: Literal["trained", "merged"] = Field(
        "trained", description="trained: the run's adapter/ (LoRA, QLoRA) or model/ (full fine-tuning); merged: "
        "the merge exporter's merged model.")
    gguf: bool | None = Field(None, description="Upload the GGUF file (and Modelfile) the run exported: true, "
                              "false, or unset: when there is one.")
    commit_message: str | None = Field(None, description="Default: `ftcore run RUN-FOLDER-NAME`.")

    @field_validator("repo_id")
    @classmethod
    def _namespaced(cls, value: str | None) -> str | None:
        parts = (value or "").split("/")
        if value is not None and (len(parts) != 2 or not all(parts)):
            raise ValueError("must be `namespace/name` (your user name or an organisation, then the repository)")
        return value


@ftcore.hookimpl
def ftcore_config_schema():
    return HubPushConfig


@ftcore.hookimpl
def ftcore_run_started(config: Any, ctx: Any) -> None:
    """Refuse before training what would make the push fail after it: no repository, no token, offline."""
    settings: HubPushConfig = config.section(NAME)
    repo_id = _repo_id(settings, ctx.output_dir)
    if settings.upload == "merged" and "merge" not in ctx.plugins.names("exporter"):
        raise ftcore.ConfigError("hub-push.upload is merged, and the run has no merge exporter: add merge to "
                                 "--plugins (before hub-push), or upload the trained adapter (hub-push.upload: "
                                 "trained).")
    if ctx.is_main_process:
        _check_access(repo_id)


@ftcore.hookimpl(trylast=True)
def ftcore_export(run_dir: Path, model_dir: Path, config: Any, ctx: Any) -> list[Path]:
    """Push after the other exporters, so that the merged model and the GGUF file exist."""
    settings: HubPushConfig = config.section(NAME)
    run_dir = Path(run_dir)
    repo_id = _repo_id(settings, run_dir)
    folder = _folder(settings, Path(model_dir), run_dir, ctx)
    extra = _gguf_files(settings, ctx)
    ftcore.write_model_card(ctx, folder, repo_id=repo_id, gguf_files=[p for p in extra if p.suffix == ".gguf"])
    files = {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*"))
             if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)}
    files.update({p.name: p for p in extra})
    message = settings.commit_message or f"ftcore run {run_dir.name}"
    try:
        details = push(repo_id, files, settings, message)
    except Exception as exc:  # noqa: BLE001 - every failure to push is the same advice: the run is intact, retry
        raise ftcore.OutputError(_failure(exc, repo_id, run_dir)) from None
    ctx.result.export_details[NAME] = details
    if details["new_commit"]:
        ctx.log(f"hub-push: pushed {len(files)} files to {details['url']} ({settings.branch}, commit "
                f"{details['commit'][:12]})")
    else:
        ctx.log(f"hub-push: {details['url']} ({settings.branch}) already holds these files: no new commit")
    return []


def push(repo_id: str, files: dict[str, Path], settings: HubPushConfig, message: str) -> dict[str, Any]:
    """Create the repository and branch when missing and commit ``files`` (path in repo -> local file)."""
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi()
    url = api.create_repo(repo_id, private=settings.private, exist_ok=True)
    if settings.branch != "main":
        api.create_branch(repo_id, branch=settings.branch, exist_ok=True)
    before = api.repo_info(repo_id, revision=settings.branch).sha
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path)) for name, path in files.items()]
    commit = api.create_commit(repo_id, operations=operations, commit_message=message, revision=settings.branch)
    return {"repo_id": repo_id, "url": str(url), "branch": settings.branch, "commit": commit.oid,
            "new_commit": commit.oid != before, "files": sorted(files)}


def _repo_id(settings: HubPushConfig, run_dir: Path) -> str:
    if settings.repo_id is None:
        raise ftcore.ConfigError(f"hub-push needs the repository to push to: pass --set hub-push.repo_id="
                                 f"namespace/{Path(run_dir).name} (your user name or an organisation).")
    return settings.repo_id


def _check_access(repo_id: str) -> None:
    from huggingface_hub import HfApi, get_token, is_offline_mode

    if is_offline_mode():
        raise ftcore.ConfigError("hub-push cannot push with HF_HUB_OFFLINE set: unset it, or drop hub-push from "
                                 "--plugins and push later with `ftcore export --plugins hub-push`.")
    if get_token() is None:
        raise ftcore.ConfigError(f"hub-push needs a Hugging Face token with write access to {repo_id}: run "
                                 f"`hf auth login`, or set HF_TOKEN. Nothing was trained.")
    try:
        HfApi().whoami()
    except Exception as exc:  # noqa: BLE001
        raise ftcore.ConfigError(f"hub-push: {_reason(exc)} Nothing was trained.") from None


def _folder(settings: HubPushConfig, model_dir: Path, run_dir: Path, ctx: Any) -> Path:
    if settings.upload == "trained":
        return model_dir
    merged = Path(ctx.merged_dir) if ctx.merged_dir is not None else run_dir / "merged"
    if not (merged / "config.json").is_file():
        raise ftcore.ConfigError(f"hub-push.upload is merged, and {merged} holds no merged model: run the merge "
                                 f"exporter first (`ftcore export --model {run_dir} --plugins merge,hub-push`).")
    return merged


def _gguf_files(settings: HubPushConfig, ctx: Any) -> list[Path]:
    """The GGUF file(s) the run exported and the Ollama Modelfile beside them, as the settings ask."""
    if settings.gguf is False:
        return []
    exported = [Path(p) for p in ctx.result.exports if Path(p).is_file()]
    gguf = [p for p in exported if p.suffix == ".gguf"]
    if settings.gguf and not gguf:
        raise ftcore.ConfigError("hub-push.gguf is true, and the run exported no GGUF file: add gguf-export to "
                                 "--plugins (before hub-push), or set hub-push.gguf: false.")
    folders = {p.parent for p in gguf}
    return gguf + [p for p in exported if p.name == "Modelfile" and p.parent in folders]


def _reason(exc: BaseException) -> str:
    """What went wrong, in words that say what to do; the token never appears."""
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError

    status = getattr(getattr(exc, "response", None), "status_code", None)
    if status == 401:
        return (f"the Hub ({constants.ENDPOINT}) refused the token (HF_TOKEN, or the one `hf auth login` saved): "
                f"it is missing, invalid or expired. Give a token with write access.")
    if status == 403:
        return "the token has no write access to that namespace: use a token (or a namespace) you can write to."
    if isinstance(exc, HfHubHTTPError) and status is not None:
        server = exc.server_message or str(exc).splitlines()[0]
        return f"the Hub answered {status}: {server.strip()}."
    if isinstance(exc, OSError) or type(exc).__name__ in ("ConnectError", "TimeoutException", "ReadTimeout"):
        return f"the Hub ({constants.ENDPOINT}) could not be reached ({type(exc).__name__})."
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def _failure(exc: BaseException, repo_id: str, run_dir: Path) -> str:
    return (f"hub-push: could not push to {repo_id}: {_reason(exc)} The run is intact in {run_dir}; push it "
            f"again with: ftcore export --model {run_dir} --plugins hub-push --set hub-push.repo_id={repo_id}")
