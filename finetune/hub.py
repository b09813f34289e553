"""The Hugging Face hub, asked once and quickly before anything loads.

Left to themselves, transformers and datasets meet an unreachable hub with a minute of retries and a long traceback.
Here one request (no retries, a few seconds at most) says whether a hub model or dataset can be fetched: if the hub
cannot be reached but the files are in the local cache, the process goes offline (HF_HUB_OFFLINE=1) so that the
libraries read the cache at once; otherwise the user gets one paragraph naming the id and the ways out.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from .errors import UserError

TIMEOUT_S = 5  # one request; a hub that has not answered by then is treated as unreachable


class HubError(UserError):
    """A hub model or dataset that cannot be fetched; the message names it and what to do."""


def offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set: the libraries will not ask the hub."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in {"1", "ON", "YES", "TRUE"}


def go_offline() -> None:
    """Offline mode for this process and the processes it starts. huggingface_hub and datasets read the variable
    when first imported, so modules already loaded (in-process tests) get their flag set too."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    hub_constants = sys.modules.get("huggingface_hub.constants")
    if hub_constants is not None:
        hub_constants.HF_HUB_OFFLINE = True
    datasets_config = sys.modules.get("datasets.config")
    if datasets_config is not None:
        datasets_config.HF_HUB_OFFLINE = datasets_config.HF_DATASETS_OFFLINE = True


def _endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def _cache_root() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def model_cached(repo_id: str, revision: str | None) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json", revision=revision), str)


def dataset_cached(repo_id: str) -> bool:
    """The dataset's files in the hub cache, or datasets' own prepared copy of it."""
    from datasets import config

    snapshots = _cache_root() / f"datasets--{repo_id.replace('/', '--')}" / "snapshots"
    prepared = Path(config.HF_DATASETS_CACHE) / repo_id.replace("/", "___")
    return (snapshots.is_dir() and any(snapshots.iterdir())) or prepared.is_dir()


def _ask(kind: str, repo_id: str, revision: str | None) -> str | None:
    """None when the hub has the repository; the reason when it cannot be reached. Raises HubError when the hub
    answers that the repository does not exist or is gated."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    api = HfApi(endpoint=_endpoint())
    info = api.model_info if kind == "model" else api.dataset_info
    try:
        info(repo_id, revision=revision, timeout=TIMEOUT_S)
    except GatedRepoError:
        raise HubError(f"{kind} `{repo_id}` is gated on the hub: accept its terms on {_endpoint()}/"
                       f"{'datasets/' if kind == 'dataset' else ''}{repo_id} and log in (`hf auth login`).") from None
    except RevisionNotFoundError:
        raise HubError(f"{kind} `{repo_id}` has no revision `{revision}` on the hub.") from None
    except RepositoryNotFoundError:
        raise HubError(f"{kind} `{repo_id}` is not on the hub (or it is private: log in with `hf auth login`). "
                       f"If it is a local path, it does not exist here ({Path.cwd()}).") from None
    except HfHubHTTPError:
        return None  # the hub answered: let the library report what it makes of it
    except Exception as e:  # connection refused, DNS, timeout, proxy: all mean the same here
        return f"{type(e).__name__}: {e}".split("\n")[0]
    return None


def _unreachable() -> str | None:
    """Why the hub cannot be reached, or None when it answers (with any status)."""
    from huggingface_hub.utils import get_session

    try:
        get_session().head(_endpoint(), timeout=TIMEOUT_S)
    except Exception as e:  # connection refused, DNS, timeout, proxy
        return f"{type(e).__name__}: {e}".split("\n")[0]
    return None


def ensure(kind: str, repo_id: str, key: str, revision: str | None = None) -> str:
    """Check that a hub `kind` ("model" or "dataset") named by recipe key `key` can be loaded. Returns a note for
    the user ("" when nothing needs saying); raises HubError, in seconds, when it cannot be."""
    cached = model_cached(repo_id, revision) if kind == "model" else dataset_cached(repo_id)
    download = f"hf download {repo_id}{' --repo-type dataset' if kind == 'dataset' else ''}"
    local = "a local folder or .gguf file" if kind == "model" else "a local .jsonl/.csv/.parquet file"
    if offline():
        if cached:
            return ""
        raise HubError(f"{kind} `{repo_id}` ({key}) is not in the local cache ({_cache_root()}), and HF_HUB_OFFLINE "
                       f"is set, so the hub is not asked. Download it where there is network (`{download}`) and "
                       f"copy the cache here, or set {key} to {local}.")
    reason = _ask(kind, repo_id, revision)
    if reason is None:
        return ""
    if cached:
        go_offline()
        return (f"the hub ({_endpoint()}) cannot be reached ({reason}); using the cached copy of {repo_id} "
                "(HF_HUB_OFFLINE=1 for this run).")
    raise HubError(f"cannot reach the Hugging Face hub ({_endpoint()}: {reason}) to fetch {kind} `{repo_id}` ({key}), "
                   f"and it is not in the local cache ({_cache_root()}). Set {key} to {local}; or download it where "
                   f"there is network (`{download}`), copy the cache here and set HF_HUB_OFFLINE=1; or fix the "
                   "connection (proxy, HF_ENDPOINT).")


def ensure_tasks(names: list[str]) -> str:
    """lm-eval task names (not local YAML files) download their datasets from the hub. Which datasets is only known
    once lm-eval has built its task index, so here the hub itself is asked: unreachable, the process goes offline
    and lm-eval reads its cache at once (a task missing from it is then reported in one line by the CLI)."""
    if not names or offline():
        return ""
    reason = _unreachable()
    if reason is None:
        return ""
    go_offline()
    return (f"the hub ({_endpoint()}) cannot be reached ({reason}); lm-eval task(s) {', '.join(names)} are read "
            "from the local cache (HF_HUB_OFFLINE=1 for this run).")


def is_network_error(error: BaseException) -> bool:
    """An exception a library raised because the hub could not be reached or was offline: what the CLI turns into
    one line when no check above caught it first."""
    if isinstance(error, BrokenPipeError):  # a ConnectionError to Python: the reader of our output went away
        return False
    names = {c.__name__ for c in type(error).__mro__}
    return bool(names & {"ConnectionError", "OfflineModeIsEnabled", "LocalEntryNotFoundError", "ConnectError",
                         "TimeoutException"}) or (
        isinstance(error, OSError) and "couldn't connect to" in str(error).lower())


def describe_network_error(error: BaseException) -> str:
    first = str(error).strip().split("\n")[0][:300]
    return (f"the Hugging Face hub could not be reached or is switched off ({type(error).__name__}: {first}). "
            "Use local files (model.path, data paths, task YAML files), or fetch what is named above where there is "
            "network and set HF_HUB_OFFLINE=1 to read it from the cache.")
