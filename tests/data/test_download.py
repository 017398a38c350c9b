"""The downloader against a real HTTP server on 127.0.0.1 (never the real host)."""

import hashlib
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from pneumo.core.errors import PneumoError
from pneumo.data.download import download, download_pneumoniamnist

ROOT = Path(__file__).resolve().parents[2]
PAYLOAD = os.urandom(3 * (1 << 20) + 12345)
MD5 = hashlib.md5(PAYLOAD).hexdigest()


class Server:
    """Serves PAYLOAD at /file.npz, honouring Range; can cut a response off after `cut` bytes."""

    def __init__(self, ranges=True):
        self.cut, self.ranges, self.requests = None, ranges, []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                outer.requests.append(self.headers.get("Range"))
                start = 0
                if outer.ranges and self.headers.get("Range"):
                    start = int(self.headers["Range"].split("=")[1].split("-")[0])
                    if start >= len(PAYLOAD):
                        self.send_response(416)
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(PAYLOAD) - 1}/{len(PAYLOAD)}")
                else:
                    self.send_response(200)
                body = PAYLOAD[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if outer.cut is not None:
                    self.wfile.write(body[: outer.cut])
                    self.wfile.flush()
                    self.connection.shutdown(2)  # the connection dies mid-transfer
                    outer.cut = None
                    return
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/file.npz"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


def test_downloads_and_verifies(tmp_path, server):
    path = download(server.url, tmp_path / "f.npz", MD5)
    assert path.read_bytes() == PAYLOAD
    assert not (tmp_path / "f.npz.part").exists()
    download(server.url, tmp_path / "f.npz", MD5)  # already there: no second request
    assert len(server.requests) == 1


def test_interrupted_download_resumes_where_it_stopped(tmp_path, server):
    server.cut = 1_000_000
    with pytest.raises(PneumoError, match="broke off.*run the same command again to resume"):
        download(server.url, tmp_path / "f.npz", MD5, timeout=5)
    assert not (tmp_path / "f.npz").exists()  # nothing half-written under the real name
    assert (tmp_path / "f.npz.part").stat().st_size == 1_000_000
    download(server.url, tmp_path / "f.npz", MD5)
    assert server.requests[-1] == "bytes=1000000-"
    assert (tmp_path / "f.npz").read_bytes() == PAYLOAD


def test_server_without_ranges_starts_over(tmp_path):
    server = Server(ranges=False)
    try:
        (tmp_path / "f.npz.part").write_bytes(PAYLOAD[:500])
        download(server.url, tmp_path / "f.npz", MD5)
        assert (tmp_path / "f.npz").read_bytes() == PAYLOAD
    finally:
        server.close()


def test_checksum_mismatch_keeps_nothing(tmp_path, server):
    with pytest.raises(PneumoError, match="arrived with md5 .* expected 0+"):
        download(server.url, tmp_path / "f.npz", "0" * 32)
    assert list(tmp_path.iterdir()) == []


def test_offline_is_one_clear_sentence(tmp_path):
    closed = Server()
    url = closed.url
    closed.close()  # nothing listens on that port any more
    with pytest.raises(PneumoError, match="cannot reach 127.0.0.1:\\d+ .*check the network connection"):
        download(url, tmp_path / "f.npz", MD5, timeout=5)


@pytest.mark.parametrize("url, phrase", [("http://[::1", "is not a URL"), ("notaurl", "not an http:// or https://")])
def test_a_base_url_that_is_no_url_is_one_sentence(tmp_path, url, phrase):
    with pytest.raises(PneumoError, match=phrase):
        download_pneumoniamnist([28], tmp_path, url)


def test_command_line_exit_codes(tmp_path, server):
    base = server.url.rsplit("/", 1)[0]
    # The real checksums do not fit the test payload: a clean failure, exit 2, nothing left behind.
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "download_data.py"),
            "--size",
            "28",
            "--out",
            str(tmp_path),
            "--base-url",
            base,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "expected 28209eda62fecd6e6a2d98b1501bb15f" in result.stderr
    assert server.requests == [None]  # one plain request, to the mirror given
    assert not list(tmp_path.glob("*.npz"))
