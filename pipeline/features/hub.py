"""Pretrained timm weights from the Hugging Face hub, through the standard cache (`HF_HOME`).

The file is fetched with huggingface_hub as timm itself does (a progress bar while downloading; the
cache alone with `HF_HUB_OFFLINE=1` or without network), and its path is returned so that the very
file timm then loads is the one whose SHA-256 the feature cache records.
"""
from __future__ import annotations

import os
from pathlib import Path

from pipeline.runtime.errors import InputError

# The files timm reads from a hub repository, in its order: safetensors first, the pickle as a fallback.
HUB_FILES = ("model.safetensors", "pytorch_model.bin")


def pretrained_name(model_name: str) -> str:
    """`architecture.tag` as timm resolves it (the default tag when none is given)."""
    import timm
    from timm.models import get_pretrained_cfg, split_model_name_tag
    architecture, tag = split_model_name_tag(model_name)
    if not timm.is_model(architecture):
        raise InputError(f"unknown timm model '{architecture}'; see timm.list_models()")
    try:
        cfg = get_pretrained_cfg(model_name)
    except RuntimeError:
        tags = [n.partition(".")[2] for n in timm.list_pretrained(f"{architecture}.*")]
        raise InputError(f"timm model {architecture} has no pretrained tag '{tag}'; "
                        f"its tags are: {', '.join(tags) or 'none'}")
    has_weights = cfg is not None and bool(cfg.hf_hub_id or cfg.url)
    return f"{architecture}.{cfg.tag}" if has_weights and cfg.tag else architecture


def hub_weights(model_name: str) -> Path:
    """Local path of the pretrained weights of timm model `model_name` (downloaded on first use)."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError
    from timm import __version__ as timm_version
    from timm.models import get_pretrained_cfg
    cfg = get_pretrained_cfg(model_name)
    if cfg is None or not cfg.hf_hub_id:
        raise InputError(f"timm/{model_name} has no pretrained weights on the Hugging Face hub; "
                        f"pass --weights PATH to a local .safetensors or .pth file, or --weights none")
    repo, _, revision = cfg.hf_hub_id.partition("@")
    files = _files(cfg.hf_hub_filename)
    unreachable = False
    for filename in files:
        try:
            return Path(hf_hub_download(repo, filename, revision=revision or None, library_name="timm",
                                        library_version=timm_version, local_files_only=unreachable))
        except LocalEntryNotFoundError:
            unreachable = True    # not cached and no network: perhaps the next file is cached
        except EntryNotFoundError:
            continue              # the repository has no such file: timm falls back to the next
        except (HfHubHTTPError, OSError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
            raise InputError(f"cannot fetch {filename} of Hugging Face repository {repo} ({reason}); "
                            f"pass --weights PATH to a local .safetensors or .pth file")
    if not unreachable:
        raise InputError(f"Hugging Face repository {repo} has none of {', '.join(files)}; "
                        f"pass --weights PATH to a local .safetensors or .pth file")
    offline = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the hub cannot be reached"
    raise InputError(f"timm/{model_name}: {files[0]} of Hugging Face repository {repo} is not in the cache "
                    f"({os.path.join(constants.HF_HUB_CACHE, 'models--' + repo.replace('/', '--'))}) and {offline}; "
                    f"run once with network to download it, or pass --weights PATH to a local copy")


def _files(named: str | None) -> tuple[str, ...]:
    """The files to look for, in timm's order: a pickle's safetensors version before the pickle itself."""
    if not named:
        return HUB_FILES
    if not named.endswith(".bin"):
        return (named,)
    safe = "open_clip_model.safetensors" if named == "open_clip_pytorch_model.bin" else named[:-4] + ".safetensors"
    return safe, named
