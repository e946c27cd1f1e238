"""Models by Hugging Face Hub id: ``org/name``, optionally ``org/name@revision`` (a branch, tag or commit).

Everything goes through the real ``huggingface_hub`` client, so its standard cache is used and filled
and its settings hold: ``HF_HOME`` / ``HF_HUB_CACHE`` (where the cache is), ``HF_HUB_OFFLINE`` (use the
cache only), ``HF_TOKEN`` (or the token ``hf auth login`` saved) and ``HF_ENDPOINT`` (another Hub).
Only what a run needs is fetched: the config, the tokenizer files, the model card and the safetensors
weights; never pickle weights (``*.bin``, ``*.pt``: see docs/safety.md), and Python files only when
``model.trust_remote_code`` is on. A repository that has no safetensors weights, or whose model needs
its own code while that is off, is refused before any weight is downloaded. A download reports its
progress through the run's log, and huggingface_hub resumes a file from where a dropped connection
cut it (an HTTP Range request).

Every failure the user can fix (a repository or revision that does not exist, a gated model, no network
and nothing cached, a refused token) is a ``ConfigError`` that says what to do; the token itself is
never shown.
"""

from __future__ import annotations

import difflib
import io
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftcore.errors import ConfigError

REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
NEEDED = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
          "special_tokens_map.json", "added_tokens.json", "tokenizer.model", "vocab.json", "merges.txt",
          "chat_template.jinja", "chat_template.json", "README.md", "*.safetensors", "*.safetensors.index.json")
WEIGHTS = ("*.safetensors", "*.safetensors.index.json")
CODE = ("*.py",)
PICKLE = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass(frozen=True)
class HubRef:
    """A model asked for by id: ``repo_id`` and the revision asked for (None: the default branch)."""

    repo_id: str
    revision: str | None = None

    def __str__(self) -> str:
        return self.repo_id + (f"@{self.revision}" if self.revision else "")


@dataclass(frozen=True)
class HubModel:
    """A model fetched from the Hub: the snapshot folder in the cache and the commit it is."""

    repo_id: str
    commit: str
    path: Path


def parse_hub_id(text: str, revision: str | None = None) -> HubRef | None:
    """``org/name`` or ``org/name@revision`` as a HubRef; None for anything else (a local folder that exists,
    a path, a builtin ``ftcore:`` model). ``revision`` (``model.revision``) may name the revision instead."""
    name, _, at = str(text).partition("@")
    if not REPO_ID.match(name) or Path(name).expanduser().exists():
        return None
    if at and revision and at != revision:
        raise ConfigError(f"model {text!r} names revision {at!r} but model.revision is {revision!r}: give one.")
    return HubRef(name, at or revision)


# -- fetching ------------------------------------------------------------------------------

def fetch_model(ref: HubRef, log: Callable[[str], None] = print, *, trust_remote_code: bool = False,
                weights: bool = True) -> HubModel:
    """The model's files (config, tokenizer, safetensors weights unless ``weights=False``) in the Hugging Face
    cache, downloaded if needed."""
    revision = _resolve(ref)
    info = _info(ref, revision.resolved)
    if info is None:
        return _cached(ref, revision, log, patterns(trust_remote_code, weights))
    files = {s.rfilename: s.size for s in info.siblings or []}
    check_files(ref, list(files))
    config = _config(ref, revision)
    check_remote_code(config, str(ref), trust_remote_code)
    wanted_patterns = patterns(trust_remote_code, weights)
    wanted = [f for f in files if any(Path(f).match(p) for p in wanted_patterns)]
    path = _download(ref, revision, wanted, files, log, wanted_patterns)
    return HubModel(ref.repo_id, revision.resolved, Path(path))


def patterns(trust_remote_code: bool = False, weights: bool = True) -> list[str]:
    """The files of a model repository that are fetched."""
    return [p for p in NEEDED if weights or p not in WEIGHTS] + list(CODE if trust_remote_code else ())


def fetch_config(ref: HubRef, log: Callable[[str], None] = print) -> Path:
    """The model's config.json alone (what ``ftcore estimate`` reads), from the cache or the Hub."""
    revision = _resolve(ref)
    info = _info(ref, revision.resolved)
    if info is None:
        return _cached(ref, revision, log, ["config.json"]).path / "config.json"
    if "config.json" not in {s.rfilename for s in info.siblings or []}:
        raise ConfigError(f"model {ref}: the repository has no config.json, so it is not a transformers model.")
    return _snapshot_file(ref, revision, "config.json")


def _resolve(ref: HubRef) -> Any:
    """The commit the revision names now (a ``ResolvedRevision``); the Hub is asked, else the cache's record of it.

    huggingface_hub records the answer in the cache (``refs/``), so that the revision still resolves offline.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RevisionResolutionError

    try:
        return HfApi().resolve_revision(ref.repo_id, revision=ref.revision)
    except RevisionResolutionError as exc:
        raise not_cached(ref, exc) from None
    except Exception as exc:  # noqa: BLE001 - sorted into user errors; anything else is raised as it was
        raise hub_error(exc, ref) from None


def _info(ref: HubRef, commit: str) -> Any:
    """The repository's files at the commit, or None when the Hub cannot be asked (offline, unreachable)."""
    from huggingface_hub import HfApi

    try:
        return HfApi().model_info(ref.repo_id, revision=commit, files_metadata=True)
    except Exception as exc:  # noqa: BLE001
        if unreachable(exc):
            return None
        raise hub_error(exc, ref) from None


def _config(ref: HubRef, revision: Any) -> dict[str, Any]:
    path = _snapshot_file(ref, revision, "config.json")
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"model {ref}: its config.json is not readable JSON ({exc}).") from None


def _snapshot_file(ref: HubRef, revision: Any, filename: str) -> Path:
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(ref.repo_id, filename, revision=revision))
    except Exception as exc:  # noqa: BLE001
        raise hub_error(exc, ref) from None


def _download(ref: HubRef, revision: Any, wanted: list[str], sizes: dict[str, int | None],
              log: Callable[[str], None], patterns: list[str]) -> str:
    from huggingface_hub import snapshot_download, try_to_load_from_cache

    commit = revision.resolved
    missing = [f for f in wanted if not isinstance(try_to_load_from_cache(ref.repo_id, f, revision=commit), str)]
    label = f"{ref.repo_id} (commit {commit[:12]})"
    if not missing:
        log(f"base model {label}: in the Hugging Face cache")
    else:
        total = sum(sizes.get(f) or 0 for f in missing)
        log(f"downloading {label} into the Hugging Face cache: {len(missing)} file(s), {megabytes(total)}")
    progress = DownloadProgress(label, log)
    try:
        path = snapshot_download(ref.repo_id, revision=revision, allow_patterns=patterns,
                                 tqdm_class=progress.bar_class())
    except Exception as exc:  # noqa: BLE001
        raise hub_error(exc, ref) from None
    if missing:
        log(f"downloaded {label}: {megabytes(progress.received())} in {time.time() - progress.started:.1f}s")
    return path


def _cached(ref: HubRef, revision: Any, log: Callable[[str], None], wanted: list[str]) -> HubModel:
    """The model's ``wanted`` files from the cache alone (offline, or the Hub unreachable); a clear error when
    they are not there."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    commit = revision.resolved
    try:
        path = Path(snapshot_download(ref.repo_id, revision=commit, allow_patterns=wanted, local_files_only=True))
    except LocalEntryNotFoundError as exc:   # not there, or only part of it (IncompleteSnapshotError)
        raise not_cached(ref, exc) from None
    log(f"base model {ref.repo_id} (commit {commit[:12]}): from the Hugging Face cache, without asking the Hub "
        f"({'HF_HUB_OFFLINE is set' if offline() else 'the Hub could not be reached'})")
    return HubModel(ref.repo_id, commit, path)


# -- checks --------------------------------------------------------------------------------

def check_files(ref: HubRef, files: list[str]) -> None:
    """Refuse, before downloading anything, a repository without config.json or with pickle weights only."""
    if "config.json" not in files:
        raise ConfigError(f"model {ref}: the repository has no config.json, so it is not a transformers model "
                          f"(an adapter or a GGUF repository, say). Pass the id of a transformers model.")
    if not any(f.endswith(".safetensors") for f in files):
        pickles = [f for f in files if f.endswith(PICKLE)]
        if pickles:
            raise ConfigError(f"model {ref} has weights only as pickle files ({', '.join(pickles[:3])}), which can "
                              f"run code when loaded; ftcore loads safetensors only (see docs/safety.md), so nothing "
                              f"was downloaded. Use a revision or a copy of the model with safetensors weights.")
        raise ConfigError(f"model {ref}: the repository has no weights (*.safetensors).")


def needs_remote_code(config: dict[str, Any]) -> bool:
    """Whether the model can only be built by code shipped with it: an ``auto_map`` and an architecture
    (``model_type``) this transformers does not know. A known architecture is built by transformers itself."""
    if not config.get("auto_map"):
        return False
    from transformers import CONFIG_MAPPING

    return config.get("model_type") not in CONFIG_MAPPING


def check_remote_code(config: dict[str, Any], where: str, trust_remote_code: bool) -> None:
    if trust_remote_code or not needs_remote_code(config):
        return
    raise ConfigError(f"model {where} needs its own Python code (config.json has an auto_map, and model_type "
                      f"{config.get('model_type')!r} is not an architecture transformers knows), and "
                      f"model.trust_remote_code is off: ftcore does not run code shipped with a model unless asked "
                      f"(docs/safety.md). Read that code first; then set model.trust_remote_code: true "
                      f"(--set model.trust_remote_code=true), or choose a model transformers supports.")


# -- errors --------------------------------------------------------------------------------

def unreachable(exc: BaseException) -> bool:
    """Offline mode, or no connection to the Hub: the cache is the only source left."""
    from huggingface_hub.errors import OfflineModeIsEnabled

    if isinstance(exc, OfflineModeIsEnabled):
        return True
    name = type(exc).__name__
    return name in ("ConnectError", "ConnectTimeout", "ReadTimeout", "TimeoutException", "ProxyError") or \
        isinstance(exc, ConnectionError)


def offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.is_offline_mode())


def endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def hub_error(exc: BaseException, ref: HubRef, kind: str = "model") -> BaseException:
    """The user error for a failed Hub call, saying what to do; a failure of ours is returned as it is."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    page = f"{endpoint()}/{'datasets/' if kind == 'dataset' else ''}{ref.repo_id}"
    if isinstance(exc, GatedRepoError):
        return ConfigError(gated_message(ref, kind, page, exc.response.status_code if exc.response is not None else 401))
    if isinstance(exc, RepositoryNotFoundError):
        return ConfigError(f"{kind} {ref.repo_id}: no such repository on the Hub ({endpoint()}), or it is private and "
                           f"your token cannot see it; there is no local folder {ref.repo_id} either."
                           + closest(ref.repo_id, kind))
    if isinstance(exc, RevisionNotFoundError):
        return ConfigError(f"{kind} {ref.repo_id} has no revision {ref.revision!r}: give a branch, tag or commit "
                           f"that exists (see {page}).")
    if isinstance(exc, LocalEntryNotFoundError) or unreachable(exc):
        return not_cached(ref, exc, kind)
    if isinstance(exc, HfHubHTTPError) and exc.response is not None:
        status = exc.response.status_code
        if status == 401:
            return ConfigError(f"the Hub ({endpoint()}) refused your token (HF_TOKEN, or the one `hf auth login` "
                               f"saved) while fetching {kind} {ref}: it is invalid or expired. Replace it, or unset "
                               f"HF_TOKEN for public {kind}s.")
        return ConfigError(f"the Hub ({endpoint()}) answered {status} while fetching {kind} {ref}: "
                           f"{_first_line(exc)}. Try again later.")
    return exc


def gated_message(ref: HubRef, kind: str, page: str, status: int) -> str:
    from huggingface_hub import get_token

    if status == 401 or get_token() is None:
        return (f"{kind} {ref.repo_id} is gated: its authors ask you to accept their conditions first. Accept them "
                f"at {page} (logged in), then give ftcore your Hugging Face token: run `hf auth login`, or set "
                f"HF_TOKEN.")
    return (f"{kind} {ref.repo_id} is gated and your token has no access to it yet: accept its conditions at {page} "
            f"with the account the token belongs to (some authors approve requests by hand), then run again.")


def not_cached(ref: HubRef, exc: BaseException, kind: str = "model") -> ConfigError:
    from huggingface_hub import constants

    why = ("HF_HUB_OFFLINE is set" if offline() else
           f"the Hub ({endpoint()}) could not be reached ({type(exc).__name__})")
    return ConfigError(f"{kind} {ref} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}), and {why}; "
                       f"there is no local folder {ref.repo_id} either. Fetch it once with network access "
                       f"(HF_HUB_OFFLINE unset), or pass a local folder.")


def closest(repo_id: str, kind: str = "model") -> str:
    """`` Did you mean "x"?`` naming the closest local folder or cached repository, or ''."""
    from huggingface_hub import constants

    prefix = f"{kind}s--"
    cached = [p.name[len(prefix):].replace("--", "/", 1) for p in Path(constants.HF_HUB_CACHE).glob(prefix + "*")]
    here = Path.cwd()   # folders named as the user would type them: relative to the working directory
    local = [p.parent.relative_to(here).as_posix() for p in [*here.glob("*/*/config.json"), *here.glob("*/config.json")]]
    match = difflib.get_close_matches(repo_id, cached + local, n=1, cutoff=0.6)
    if not match:
        return ""
    where = "in the Hugging Face cache" if match[0] in cached else "a local folder"
    return f' Did you mean "{match[0]}" ({where})?'


def _first_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


# -- progress ------------------------------------------------------------------------------

def megabytes(n: int | float) -> str:
    return f"{n / 1e6:.1f} MB"


class DownloadProgress:
    """A download's progress as lines through the run's log: one each time another quarter of the bytes is in.

    huggingface_hub draws its bars with a tqdm class it is given (``tqdm_class``); ``bar_class()`` is one
    that draws nothing and reports the byte count of the first byte bar (what arrives over the network).
    """

    STEP = 25   # percent between two lines

    def __init__(self, label: str, log: Callable[[str], None]) -> None:
        self.label, self.log = label, log
        self.started = time.time()
        self.reported = 0
        self.owner: Any = None

    def received(self) -> int:
        return int(self.owner.n) if self.owner is not None else 0

    def update(self, bar: Any) -> None:
        if bar is not self.owner:
            return
        total = bar.total or 0
        if total <= 0:
            return
        percent = min(100, int(100 * bar.n / total)) // self.STEP * self.STEP
        if percent > self.reported:
            self.reported = percent
            self.log(f"downloading {self.label}: {percent}% ({megabytes(bar.n)} of {megabytes(total)})")

    def bar_class(self) -> type:
        from tqdm import tqdm

        progress = self

        class LogBar(tqdm):
            monitor_interval = 0   # no monitor thread

            def __init__(self, *args: Any, **kwargs: Any) -> None:
                kwargs.pop("name", None)
                kwargs.update(mininterval=0, miniters=1, disable=False, file=io.StringIO())   # drawn by display()
                super().__init__(*args, **kwargs)
                if progress.owner is None and kwargs.get("unit") == "B":
                    progress.owner = self

            def display(self, msg: str | None = None, pos: int | None = None) -> bool:
                progress.update(self)
                return True

        return LogBar
