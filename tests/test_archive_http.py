"""The archive over HTTP (a loopback server of the shared mirror): download, cache, resume, verify."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest

from rltrader.data.archive import ArchiveFile, ArchiveSource, load_file
from rltrader.data.schema import Market
from rltrader.errors import NotInArchiveError

F = ArchiveFile(Market.FUTURES_UM, "klines", "FILUSDT", "1m", "monthly", "2023-08")


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Static files with single-range support, like the real archive's CDN; records what was asked."""

    requests: list[tuple[str, str | None]] = []  # noqa: RUF012 - shared log across handler instances

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        rng = self.headers.get("Range")
        RangeHandler.requests.append((self.path, rng))
        path = Path(self.translate_path(self.path))
        if not rng or not path.is_file():
            return super().do_GET()
        data = path.read_bytes()
        start = int(rng.removeprefix("bytes=").split("-")[0])
        if start >= len(data):
            self.send_response(416)
            self.end_headers()
            return
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        self.wfile.write(data[start:])


@pytest.fixture
def http_base(shared_archive: Path) -> Iterator[str]:
    RangeHandler.requests.clear()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(RangeHandler, directory=str(shared_archive)))
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_download_is_cached_and_verified(http_base: str, tmp_path: Path, shared_archive: Path) -> None:
    src = ArchiveSource(http_base, tmp_path / "cache")
    assert src.exists(F) and not src.exists(ArchiveFile(Market.FUTURES_UM, "klines", "FILUSDT", "1m", "monthly",
                                                         "2019-01"))
    rows = load_file(src, F).rows
    assert rows.height == 44640
    cached = tmp_path / "cache" / F.relpath
    assert cached.read_bytes() == (shared_archive / F.relpath).read_bytes()
    zips_fetched = [p for p, _ in RangeHandler.requests if p.endswith(".zip")]
    load_file(src, F)  # second time: only the CHECKSUM is asked for
    assert [p for p, _ in RangeHandler.requests if p.endswith(".zip")] == zips_fetched


def test_partial_download_resumes(http_base: str, tmp_path: Path, shared_archive: Path) -> None:
    src = ArchiveSource(http_base, tmp_path / "cache")
    whole = (shared_archive / F.relpath).read_bytes()
    part = tmp_path / "cache" / (F.relpath + ".part")
    part.parent.mkdir(parents=True)
    part.write_bytes(whole[:100_000])
    assert load_file(src, F).rows.height == 44640
    assert ("/" + F.relpath, "bytes=100000-") in RangeHandler.requests
    assert not part.exists()


def test_missing_file_is_not_in_archive(http_base: str, tmp_path: Path) -> None:
    src = ArchiveSource(http_base, tmp_path / "cache")
    with pytest.raises(NotInArchiveError, match="HTTP 404"):
        src.fetch(ArchiveFile(Market.FUTURES_UM, "klines", "NOPEUSDT", "1m", "monthly", "2023-08"))
