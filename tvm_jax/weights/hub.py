"""Hugging Face Hub paths: ``hf://ORG/NAME[@REVISION][/PATH]`` -> a local file or folder.

Files are fetched with ``huggingface_hub`` (the optional extra ``pip install -e ".[hub]"``, imported
only when an ``hf://`` path is used) into the standard Hugging Face cache (``HF_HUB_CACHE``,
default ``~/.cache/huggingface/hub``), so a second use, or a run with ``HF_HUB_OFFLINE=1``, reads
the cached copy. Examples::

    hf://lumaai/tvm/im256_w2.pkl          the released TVM checkpoint (a file)
    hf://stabilityai/sd-vae-ft-ema        a diffusers VAE (a folder: config.json + weights)
    hf://ORG/NAME@v1.0/sub/dir            a sub-folder at a tag, branch or commit

Every failure (package missing, offline and not cached, unknown repository or file) is a
:class:`HubError` with one line that names the path.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Sequence

SCHEME = "hf://"

__all__ = ["SCHEME", "HubError", "HubPath", "is_hub_path", "parse_hub_path", "download_file", "download_folder"]


class HubError(FileNotFoundError):
    """An ``hf://`` path could not be resolved to a local file or folder."""


@dataclasses.dataclass(frozen=True)
class HubPath:
    repo_id: str  # "ORG/NAME"
    revision: str | None  # None: the default branch
    path: str  # inside the repository; "" for its root


def is_hub_path(path) -> bool:
    return isinstance(path, str) and path.startswith(SCHEME)


def parse_hub_path(path: str) -> HubPath:
    parts = path[len(SCHEME):].split("/") if is_hub_path(path) else []
    if len(parts) < 2 or not parts[0] or not parts[1] or parts[1].startswith("@"):
        raise HubError(f"{path}: not a Hugging Face path of the form hf://ORG/NAME[@REVISION][/PATH]")
    name, _, revision = parts[1].partition("@")
    inner = [p for p in parts[2:] if p]
    if any(p in (".", "..") for p in inner):
        raise HubError(f"{path}: '.' and '..' are not allowed in a Hugging Face path")
    return HubPath(f"{parts[0]}/{name}", revision or None, "/".join(inner))


def _huggingface_hub():
    try:
        import huggingface_hub
        import huggingface_hub.constants
        import huggingface_hub.errors  # noqa: F401  (submodules used below)
    except ImportError:
        raise HubError("hf:// paths need the huggingface_hub package: pip install -e \".[hub]\" "
                       "(or pip install huggingface_hub)") from None
    return huggingface_hub


def _explain(path: str, hub_path: HubPath, error: Exception) -> str:
    hf = _huggingface_hub()
    errors = hf.errors
    cache = hf.constants.HF_HUB_CACHE
    if isinstance(error, errors.RepositoryNotFoundError):
        return (f"{path}: repository {hub_path.repo_id} not found on the Hugging Face Hub (or it is gated/private: "
                "log in with `hf auth login`)")
    if isinstance(error, errors.RevisionNotFoundError):
        return f"{path}: revision {hub_path.revision!r} not found in {hub_path.repo_id}"
    if isinstance(error, errors.EntryNotFoundError) and not isinstance(error, errors.LocalEntryNotFoundError):
        return f"{path}: no file {hub_path.path!r} in {hub_path.repo_id}"
    if isinstance(error, errors.LocalEntryNotFoundError) or hf.constants.HF_HUB_OFFLINE:
        why = ("downloads are off (HF_HUB_OFFLINE=1)" if hf.constants.HF_HUB_OFFLINE
               else "the Hub could not be reached")
        return (f"{path}: not in the local Hugging Face cache ({cache}) and {why}; download it once with network "
                "access, or point HF_HUB_CACHE at a cache that holds it")
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return f"{path}: download from the Hugging Face Hub failed: {first}"


def download_file(path: str) -> str:
    """The local path of the file ``hf://ORG/NAME[@REV]/FILE`` (downloaded into the cache if needed)."""
    hub_path = parse_hub_path(path)
    if not hub_path.path:
        raise HubError(f"{path}: names a repository, not a file (expected hf://ORG/NAME/FILE)")
    hf = _huggingface_hub()
    try:
        return hf.hf_hub_download(hub_path.repo_id, hub_path.path, revision=hub_path.revision)
    except Exception as e:  # huggingface_hub raises many types (HTTP, offline, validation)
        raise HubError(_explain(path, hub_path, e)) from None


def download_folder(path: str, files: Sequence[str]) -> str:
    """The local folder ``hf://ORG/NAME[@REV][/SUBDIR]`` holding (at least) ``files``, downloaded
    into the cache if needed (only those files, not the whole repository)."""
    hub_path = parse_hub_path(path)
    hf = _huggingface_hub()
    patterns = [f"{hub_path.path}/{f}" if hub_path.path else f for f in files]
    try:
        root = hf.snapshot_download(hub_path.repo_id, revision=hub_path.revision, allow_patterns=patterns)
    except Exception as e:
        raise HubError(_explain(path, hub_path, e)) from None
    folder = os.path.join(root, *hub_path.path.split("/")) if hub_path.path else root
    missing = [f for f in files if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        offline = " (downloads are off: HF_HUB_OFFLINE=1)" if hf.constants.HF_HUB_OFFLINE else ""
        raise HubError(f"{path}: {', '.join(missing)} not found in the snapshot {folder}{offline}")
    return folder
