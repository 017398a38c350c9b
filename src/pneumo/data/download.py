"""Downloading PneumoniaMNIST from MedMNIST's Zenodo record: resumable, md5-verified, atomic."""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

from pneumo.core.errors import PneumoError
from pneumo.core.logs import log
from pneumo.core.progress import progress

# MedMNIST v2/v3 as published on Zenodo (record 10519652), with the checksums of medmnist.INFO.
MEDMNIST_BASE_URL = "https://zenodo.org/records/10519652/files/"
PNEUMONIAMNIST = {
    28: ("pneumoniamnist.npz", "28209eda62fecd6e6a2d98b1501bb15f"),
    64: ("pneumoniamnist_64.npz", "8f4eceb4ccffa70c672198ea285246c6"),
    128: ("pneumoniamnist_128.npz", "05b46931834c231683c68f40c47b2971"),
    224: ("pneumoniamnist_224.npz", "d6a3c71de1b945ea11211b03746c1fe1"),
}
CHUNK = 1 << 20
# A server that sends no length is cut off here (the largest PneumoniaMNIST file is a few hundred MB).
MAX_BYTES = 2_000_000_000


def _require_http_url(url: str) -> None:
    try:
        parts = urlparse(url)
        parts.port  # noqa: B018 - parsing the port is what rejects "host:notaport"
    except ValueError as e:
        raise PneumoError(f"{url} is not a URL ({e})") from None
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise PneumoError(f"{url} is not an http:// or https:// URL")


def md5sum(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "md5").hexdigest()


def download(url: str, dest: str | Path, md5: str, timeout: float = 60) -> Path:
    """Fetch `url` to `dest` unless a file with that md5 is already there.

    Bytes arrive in DEST.part, which a later call continues (HTTP Range) if this one is cut off; only
    a complete file whose md5 matches is renamed to `dest`.
    """
    dest = Path(dest)
    if dest.exists() and md5sum(dest) == md5:
        log.info("%s is already there (md5 verified)", dest)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    offset = part.stat().st_size if part.exists() else 0
    host = urlparse(url).netloc
    request = urllib.request.Request(
        url, headers={"Range": f"bytes={offset}-", "User-Agent": "pneumo"} if offset else {"User-Agent": "pneumo"}
    )
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:  # nothing left to fetch: the part file is complete
            return _finish(part, dest, md5, url)
        raise PneumoError(f"downloading {url} failed: HTTP {e.code} {e.reason}") from None
    except (TimeoutError, urllib.error.URLError, ConnectionError) as e:
        reason = getattr(e, "reason", e)
        raise PneumoError(
            f"cannot reach {host} ({reason}): check the network connection, or download {url} by hand "
            f"into {dest.parent}"
        ) from None
    with response:
        if offset and response.status != 206:
            offset = 0  # the server ignored the range: start over
        remaining = int(response.headers.get("Content-Length") or 0)
        if offset:
            log.info("resuming %s at %.1f MB", dest.name, offset / 1e6)
        received = 0
        try:
            with open(part, "ab" if offset else "wb") as f:
                chunks = iter(lambda: response.read(CHUNK), b"")
                for chunk in progress(
                    chunks, total=max(1, -(-remaining // CHUNK)), desc=f"downloading {dest.name}", unit="MB"
                ):
                    f.write(chunk)
                    received += len(chunk)
                    if received > (remaining or MAX_BYTES):
                        break
            if received > (remaining or MAX_BYTES):
                part.unlink()
                limit = f"the {remaining} bytes it announced" if remaining else f"{MAX_BYTES / 1e9:.0f} GB"
                raise PneumoError(f"{url} sent more than {limit}: the partial file was deleted")
        except (TimeoutError, OSError) as e:
            raise PneumoError(f"the download of {url} broke off ({e}); run the same command again to resume") from None
        if remaining and received < remaining:  # a dropped connection reads as an early end of the body
            raise PneumoError(
                f"the download of {url} broke off after {(offset + received) / 1e6:.1f} MB; run the "
                "same command again to resume"
            )
    return _finish(part, dest, md5, url)


def _finish(part: Path, dest: Path, md5: str, url: str) -> Path:
    got = md5sum(part)
    if got != md5:
        part.unlink()
        raise PneumoError(f"{url} arrived with md5 {got}, expected {md5}: the partial file was deleted, run again")
    os.replace(part, dest)
    log.info("downloaded %s (md5 verified)", dest)
    return dest


def download_pneumoniamnist(sizes: list[int], out_dir: str | Path, base_url: str = MEDMNIST_BASE_URL) -> list[Path]:
    _require_http_url(base_url)
    out = []
    for size in sizes:
        name, md5 = PNEUMONIAMNIST[size]
        out.append(download(f"{base_url.rstrip('/')}/{name}?download=1", Path(out_dir) / name, md5))
    return out
