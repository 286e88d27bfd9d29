"""Downloads for catalog rows of kind ``url``: HTTPS only (unless the row opts in), a
progress bar, SHA-256 verified, never a partial file.

The file goes to ``data/datasets/<name>/<file name>``. It is streamed into a temporary
file in the same folder while being hashed, checked against the catalog's ``sha256``
(a mismatch deletes it), then renamed into place. A sidecar ``<file>.source.json`` records
the URL and hash, so an unchanged row is not downloaded again.
"""

from __future__ import annotations

import json
import os
import posixpath
import sys
import urllib.error
import urllib.parse
import urllib.request
from hashlib import sha256
from pathlib import Path

from lora_project.errors import UserError
from lora_project.utils.io_utils import atomic_write_json, fsync_dir
from lora_project.utils.provenance import sha256_file

CHUNK = 1 << 16
TIMEOUT_S = 60


def check_url(url: str, allow_http: bool = False) -> urllib.parse.ParseResult:
    """Refuse anything but https (http only with allow_http), and malformed URLs."""
    parts = urllib.parse.urlparse(url)
    if parts.scheme not in ("https", "http") or not parts.netloc:
        raise UserError(f"not a download URL: {url!r} (expected https://...)")
    if parts.scheme == "http" and not allow_http:
        raise UserError(f"refusing plain-HTTP download {url} (use https, or set the catalog "
                        "option allow_http=true if you trust the network)")
    return parts


def target_name(url: str) -> str:
    """A safe local file name for a URL (its last path segment, sanitised)."""
    name = posixpath.basename(urllib.parse.urlparse(url).path) or "download"
    name = "".join(c if c.isalnum() or c in "._-" else "_" for c in name).lstrip(".")
    return name or "download"


def download(url: str, folder: Path, expected_sha256: str = "", allow_http: bool = False,
             progress: bool = True, log=print) -> Path:
    """Fetch `url` into `folder` (unless already there with the same URL and hash)."""
    check_url(url, allow_http)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / target_name(url)
    meta_path = target.with_name(target.name + ".source.json")
    if target.is_file() and meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except ValueError:
            meta = {}
        if meta.get("url") == url and (not expected_sha256 or meta.get("sha256") == expected_sha256) \
                and sha256_file(target) == meta.get("sha256"):
            return target
    tmp = folder / f".{target.name}.{os.getpid()}.part"
    digest = sha256()
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "lora-project"})
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response, open(tmp, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            bar = None
            if progress:
                from tqdm.auto import tqdm

                bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"download {target.name}",
                           file=sys.stderr, leave=False)
            while True:
                chunk = response.read(CHUNK)
                if not chunk:
                    break
                out.write(chunk)
                digest.update(chunk)
                if bar is not None:
                    bar.update(len(chunk))
            if bar is not None:
                bar.close()
            out.flush()
            os.fsync(out.fileno())
            if total is not None and out.tell() != total:
                raise UserError(f"download of {url} ended early ({out.tell()} of {total} bytes)")
        got = digest.hexdigest()
        if expected_sha256 and got != expected_sha256:
            raise UserError(f"checksum mismatch for {url}: expected sha256 {expected_sha256[:16]}..., "
                            f"got {got[:16]}...; the download was deleted")
        os.replace(tmp, target)
        fsync_dir(folder)
        atomic_write_json(meta_path, {"url": url, "sha256": got, "bytes": target.stat().st_size})
        log(f"downloaded {url} -> {target} ({target.stat().st_size:,} bytes, sha256 {got[:16]}...)")
        return target
    except urllib.error.HTTPError as exc:
        raise UserError(f"download failed: {url} answered HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
        reason = getattr(exc, "reason", exc)
        raise UserError(f"download failed: {url} ({reason})") from None
    finally:
        tmp.unlink(missing_ok=True)
