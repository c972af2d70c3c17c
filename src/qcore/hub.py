"""Hugging Face Hub ids (``org/name``) resolved to a local snapshot folder through huggingface_hub.

The same sources as transformers, read when a model is resolved (not at import): the cache in
``HF_HUB_CACHE``, else ``HF_HOME/hub``, else ``~/.cache/huggingface/hub``; a ``revision`` (branch,
tag or commit); ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) to use only the cache. Online, the
files a model needs are downloaded into that cache: configs, tokenizers and safetensors weights;
pickle-based ``*.bin`` weights only when the caller allows pickle.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from qcore.plugin.errors import CheckpointError

#: ``org/name`` as the Hub spells repository ids.
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
#: Files fetched for a model: configs, tokenizer files, safetensors weights (and their index).
MODEL_PATTERNS = ("*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja", "*.py")
#: Pickle-based weights, fetched only with ``allow_pickle``.
PICKLE_PATTERNS = ("*.bin",)
OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
TRUE_VALUES = frozenset({"1", "on", "yes", "true"})

__all__ = ["hub_cache_dir", "hub_offline", "is_hub_id", "resolve_hub_id"]


def is_hub_id(name: str) -> bool:
    """True for ``org/name`` strings that are not an existing local path."""
    return bool(HUB_ID.match(name)) and not Path(name).expanduser().exists()


def hub_cache_dir() -> Path:
    """The Hub cache folder huggingface_hub would use, from the environment as it is now."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "huggingface" / "hub"


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) asks for the cache only."""
    return any(os.environ.get(k, "").strip().lower() in TRUE_VALUES for k in OFFLINE_VARS)


def resolve_hub_id(repo_id: str, revision: str | None = None, allow_pickle: bool = False) -> Path:
    """The local snapshot folder of ``repo_id`` at ``revision``: from the cache, downloading when online."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    cache, offline = hub_cache_dir(), hub_offline()
    at = f" at revision '{revision}'" if revision else ""
    patterns = list(MODEL_PATTERNS) + (list(PICKLE_PATTERNS) if allow_pickle else [])
    try:
        folder = snapshot_download(repo_id, revision=revision, cache_dir=cache, local_files_only=offline,
                                   allow_patterns=patterns)
    except LocalEntryNotFoundError:
        how = ("HF_HUB_OFFLINE is set, so nothing is downloaded: unset it to download the model once"
               if offline else "the Hub could not be reached to download it: connect once")
        raise CheckpointError(
            f"model '{repo_id}'{at} (no local folder of that name, so read as a Hub id) is not in the "
            f"Hugging Face cache {cache}; {how}, or point HF_HOME "
            f"(or HF_HUB_CACHE) at a cache that holds it, or pass a local model directory"
        ) from None
    except GatedRepoError:
        raise CheckpointError(f"model '{repo_id}' is gated on the Hub: accept its terms on huggingface.co "
                              "and log in (hf auth login or HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise CheckpointError(f"model '{repo_id}' has no revision '{revision}' on the Hub; pass a branch, "
                              "tag or commit that exists (--revision)") from None
    except RepositoryNotFoundError:
        raise CheckpointError(f"no local folder '{repo_id}' and no model of that id on the Hugging Face Hub "
                              "(or it is private: log in with hf auth login or HF_TOKEN); check the name, "
                              "or pass a local directory") from None
    except HfHubHTTPError as exc:
        raise CheckpointError(f"downloading '{repo_id}'{at} from the Hub failed: {exc}") from None
    return Path(folder)
