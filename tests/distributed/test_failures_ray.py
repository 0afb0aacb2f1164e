"""Joining a cluster fails fast and cleanly (issue 18 items 8 and 9), with real sockets and Ray.

Something that is not a Ray head listens at the address: an HTTP server (what the dashboard's
port answers), and a server that accepts connections and never answers. Both used to make
``ray.init`` retry without end, after the run had already created ``OUT/.lock`` and
``OUT/manifest.json`` (which makes the launchers add ``--resume``).
"""

from __future__ import annotations

import http.server
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("ray", reason="Ray is not installed: pip install 'dist-pgkm[ray]'")

from dist_pgkm.config.quantize import QuantizeConfig
from dist_pgkm.distributed.coordinator import quantize_model
from dist_pgkm.errors import DistributedError


@pytest.fixture
def http_port() -> Iterator[int]:
    """An HTTP/1.1 server on loopback, as on a dashboard's port."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts connections and never says a word."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        yield s.getsockname()[1]


def test_http_server_at_address_fails_fast_and_leaves_out_untouched(
    tmp_path: Path, model: Path, config: QuantizeConfig, http_port: int
) -> None:
    out = tmp_path / "out"
    start = time.monotonic()
    with pytest.raises(
        DistributedError, match=r"is not a Ray cluster's head \(GCS\): it does not speak Ray's"
    ):
        quantize_model(model, config, out, address=f"127.0.0.1:{http_port}", workers=1)
    assert time.monotonic() - start < 5  # measured: ~0.05 s
    assert not out.exists()  # item 9: no .lock, no manifest.json


def test_silent_server_at_address_fails_within_the_connect_timeout(
    tmp_path: Path, model: Path, config: QuantizeConfig, silent_port: int
) -> None:
    out = tmp_path / "out"
    out.mkdir()  # an existing, empty --out stays empty
    start = time.monotonic()
    with pytest.raises(DistributedError, match=r"did not answer within 10 s"):
        quantize_model(model, config, out, address=f"127.0.0.1:{silent_port}", workers=1)
    assert time.monotonic() - start < 15  # the bound in docs/distributed.md: 10 s
    assert list(out.iterdir()) == []


@pytest.mark.parametrize(
    ("address", "message"),
    [
        ("http://127.0.0.1:8265", r"is a URL.*e\.g\. 127\.0\.0\.1:6379.*ray-job-submit\.sh"),
        ("ray://127.0.0.1:10001", r"a ray:// address \(Ray Client\) is not supported"),
    ],
)
def test_url_as_address_is_named(
    tmp_path: Path, model: Path, config: QuantizeConfig, address: str, message: str
) -> None:
    with pytest.raises(DistributedError, match=message):
        quantize_model(model, config, tmp_path / "out", address=address, workers=1)
    assert not (tmp_path / "out").exists()
