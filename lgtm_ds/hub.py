"""Model, tokenizer and dataset names: a local folder or a Hugging Face Hub name, checked once
before anything is loaded, so a typo or a machine without network fails in seconds with one
clear error instead of a minute of hub retries and a traceback.

:func:`check_sources` runs at the start of a training run:

* a name that looks like a path (absolute, ``./``, ``~``, more than one ``/``) and is not a
  folder: "no such folder" (not the hub's "Repo id must be in the form ..." message);
* a name that is neither a folder nor a valid hub repo id: said so;
* the hub offline (``HF_HUB_OFFLINE=1``) or unreachable (one HEAD request to ``HF_ENDPOINT``
  with a 5 s timeout, through the usual proxy variables): every hub name must already be in the
  local cache, and this process then runs offline (``huggingface_hub`` and ``datasets`` read
  the cache without retrying the network); a name not cached is one error naming the key.
"""

from __future__ import annotations

import functools
import os
import urllib.error
import urllib.request

from .errors import ConfigError

_TRUE = {"1", "ON", "YES", "TRUE"}


def _env_offline() -> bool:
    return any(
        os.environ.get(k, "").upper() in _TRUE
        for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
    )


@functools.lru_cache(maxsize=1)
def hub_unavailable(timeout_s: float = 5.0) -> str | None:
    """Why the hub cannot be used (offline mode set, or unreachable), or None when it can."""
    if _env_offline():
        return "offline mode is set (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE / HF_DATASETS_OFFLINE)"
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    request = urllib.request.Request(endpoint, method="HEAD")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s):
            pass
    except urllib.error.HTTPError:
        return None  # it answered
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        return f"the Hugging Face Hub ({endpoint}) is unreachable: {reason}"
    return None


def _looks_like_path(name: str) -> bool:
    return os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1


def _in_cache(name: str, repo_type: str) -> bool:
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(name, repo_type=repo_type, local_files_only=True)
    except Exception:  # noqa: BLE001 - not cached (or not a valid id)
        return False
    return True


def go_offline() -> None:
    """Make this process read the hub cache only (no network attempts, no retries)."""
    os.environ["HF_HUB_OFFLINE"] = "1"  # for libraries imported from now on
    import huggingface_hub.constants as hc

    hc.HF_HUB_OFFLINE = True
    try:
        import datasets.config

        datasets.config.HF_HUB_OFFLINE = True
        datasets.config.HF_DATASETS_OFFLINE = True
    except ImportError:
        pass


def check_sources(sources: list[tuple[str, str, str]]) -> None:
    """``sources``: ``(config key, name or path, "model" | "dataset")``. Raises one
    ConfigError for the first name that cannot be loaded; goes offline (:func:`go_offline`)
    when the hub is offline or unreachable and every hub name is cached."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    hub = []
    for key, name, repo_type in sources:
        path = os.path.expanduser(name)
        if os.path.isdir(path) or (repo_type == "dataset" and os.path.isfile(path)):
            continue  # local: nothing to ask the hub
        if name.lower().endswith(".gguf"):  # a local GGUF checkpoint (model.*: file.gguf)
            if not os.path.isfile(path):
                raise ConfigError(
                    f"{key}: no such GGUF file {name!r} (relative paths start from {os.getcwd()})"
                )
            continue
        if _looks_like_path(name) or os.path.exists(path):
            raise ConfigError(
                f"{key}: no such folder {name!r} (relative paths start from {os.getcwd()})"
            )
        try:
            validate_repo_id(name)
        except HFValidationError:
            raise ConfigError(
                f"{key}: {name!r} is neither a local folder nor a Hugging Face Hub name"
            ) from None
        hub.append((key, name, repo_type))
    if not hub:
        return
    why = hub_unavailable()
    if why is None:
        return
    for key, name, repo_type in hub:
        if not _in_cache(name, repo_type):
            from huggingface_hub.constants import HF_HUB_CACHE

            flag = " --repo-type dataset" if repo_type == "dataset" else ""
            raise ConfigError(
                f"{key}: {name!r} is not a local folder and not in the Hugging Face cache "
                f"({HF_HUB_CACHE}), and {why}: download it once on a machine with network "
                f"(e.g. `hf download {name}{flag}` with the same HF_HOME), or point {key} at a "
                f"local folder"
            )
    go_offline()
