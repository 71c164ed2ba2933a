"""Image download for URL datasets (PixMo): cache, sha256 check, retries with backoff, resume, failure record.

Cache layout under `cache_dir`: `images/<sha256(url)>` holds the bytes, `failed/<sha256(url)>.json` the error of
a URL that could not be fetched. Both survive interruption, so a rerun resumes where it stopped, and a failed URL is
not retried on every rerun (pass `retry_failed=True` to try them again).
"""

from __future__ import annotations

import hashlib
import json
import os
import ssl
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

Fetch = Callable[[str, float], bytes]  # (url, timeout_s) -> bytes; raises on failure

# HTTP statuses worth another try; anything else (404, 403, 410, ...) is permanent.
TRANSIENT_STATUS = {408, 425, 429, 500, 502, 503, 504}


def url_fetch(verify_ssl: bool = True) -> Fetch:
    context = None if verify_ssl else ssl._create_unverified_context()

    def fetch(url: str, timeout: float) -> bytes:
        request = urllib.request.Request(url, headers={"User-Agent": "molmo_fast-data/1.0"})
        with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
            return response.read()

    return fetch


def _transient(exn: Exception) -> bool:
    if isinstance(exn, urllib.error.HTTPError):
        return exn.code in TRANSIENT_STATUS
    return isinstance(exn, (urllib.error.URLError, TimeoutError, ConnectionError, OSError))


@dataclass
class DownloadStats:
    fetched: int = 0
    cached: int = 0
    failed: int = 0
    sha_mismatch: int = 0
    failures: list[dict] = field(default_factory=list)  # first few, for the summary

    def summary(self) -> dict:
        return {"fetched": self.fetched, "cached": self.cached, "failed": self.failed,
                "sha_mismatch": self.sha_mismatch, "examples_of_failures": self.failures[:20]}


class ImageFetcher:
    """`fetcher.get(url, sha256=None) -> bytes | None` (None = lost; the reason is recorded). Thread-safe."""

    def __init__(self, cache_dir: str | os.PathLike, fetch: Fetch | None = None, retries: int = 3,
                 timeout: float = 10.0, backoff: float = 1.0, retry_failed: bool = False):
        if retries < 1:
            raise ValueError(f"ImageFetcher.retries must be >= 1, got {retries}")
        self.images = Path(cache_dir) / "images"
        self.failed = Path(cache_dir) / "failed"
        self.images.mkdir(parents=True, exist_ok=True)
        self.failed.mkdir(parents=True, exist_ok=True)
        self.fetch = fetch or url_fetch()
        self.retries, self.timeout, self.backoff = retries, timeout, backoff
        self.retry_failed = retry_failed
        self.stats = DownloadStats()
        self._lock = threading.Lock()

    def _count(self, name: str, failure: dict | None = None) -> None:
        with self._lock:
            setattr(self.stats, name, getattr(self.stats, name) + 1)
            if failure is not None and len(self.stats.failures) < 100:
                self.stats.failures.append(failure)

    def get(self, url: str, sha256: str | None = None) -> bytes | None:
        key = hashlib.sha256(url.encode()).hexdigest()
        path, failed = self.images / key, self.failed / f"{key}.json"
        if path.is_file():
            data = path.read_bytes()
            if sha256 is None or hashlib.sha256(data).hexdigest() == sha256:
                self._count("cached")
                return data
            path.unlink()
        if failed.is_file() and not self.retry_failed:
            self._count("failed", json.loads(failed.read_text()))
            return None
        error = ""
        for attempt in range(self.retries):
            try:
                data = self.fetch(url, self.timeout)
            except Exception as exn:
                error = f"{type(exn).__name__}: {exn}"
                if not _transient(exn) or attempt == self.retries - 1:
                    break
                time.sleep(self.backoff * 2**attempt)
                continue
            if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
                error = "sha256 mismatch"
                self._count("sha_mismatch")
                break
            tmp = path.with_name(f"{key}.{os.getpid()}.{threading.get_ident()}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
            failed.unlink(missing_ok=True)
            self._count("fetched")
            return data
        record = {"url": url, "error": error[:500], "attempts": attempt + 1}
        tmp = failed.with_name(f"{key}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps(record))
        os.replace(tmp, failed)
        self._count("failed", record)
        return None
