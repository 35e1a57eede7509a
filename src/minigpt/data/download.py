"""`minigpt download`: fetch a catalogue corpus, a URL or a Hugging Face dataset into a directory,
resumably and verified.

The bytes go to `NAME.part` beside the target, appended with an HTTP Range request when a previous
attempt was cut off. Only when the whole file is there is its SHA-256 checked (against `--sha256` or
the catalogue's pin), then a cleaning hook runs if the source has one (Project Gutenberg's header and
footer, enwik8's zip), and the result is renamed into place. So the final name only ever holds a
complete, verified file. A cut connection, a timeout or a full disk keep the `.part` (its bytes are
a correct prefix, written unbuffered) for the next run to resume; a checksum mismatch deletes it,
since a corrupted download must not be resumed from. Every failure is one DataError line.
"""

from __future__ import annotations

import dataclasses
import http.client
import os
import re
import shutil
import sys
import zipfile
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from urllib.error import HTTPError, URLError
from urllib.parse import unquote, urlsplit
from urllib.request import Request, urlopen

from tqdm import tqdm

from ..errors import DataError
from ..fsio import fsync_dir, sha256_file
from .catalogue import Source, find
from .formats import DATA_EXTRA

BLOCK = 1 << 16
USER_AGENT = "minigpt-download/0.1 (+https://github.com/)"
_HEX64 = re.compile(r"[0-9a-f]{64}")
_GUTENBERG_START = re.compile(rb"^\*\*\*\s*START OF (THE|THIS) PROJECT GUTENBERG", re.I)
_GUTENBERG_END = re.compile(rb"^\*\*\*\s*END OF (THE|THIS) PROJECT GUTENBERG", re.I)


@dataclass
class Downloaded:
    path: Path
    sha256: str | None  # of the bytes downloaded (before cleaning); None for Hub snapshots
    verified: bool  # checked against a pin or --sha256
    resumed_from: int = 0  # bytes that were already in the .part file
    existed: bool = False  # the target was already there; nothing was downloaded


def download(what: str, out_dir: str | Path = "data", sha256: str | None = None,
             timeout: float = 30.0, progress: bool = True, mirror: str | None = None) -> Downloaded:
    """Download a catalogue NAME, an http(s) URL, or hf:OWNER/NAME[/PATH] into `out_dir`.

    `mirror`: a base URL that serves catalogue files under their upstream file names (a local
    copy for machines without internet); the pins still apply, so the bytes must be the same.
    """
    if sha256 is not None:
        sha256 = sha256.strip().lower()
        if not _HEX64.fullmatch(sha256):
            raise DataError(f"--sha256 must be 64 hexadecimal digits, got {sha256!r}")
    if not timeout > 0:
        raise DataError(f"--timeout must be > 0 seconds, got {timeout:g}")
    out = Path(out_dir)
    if what.startswith("hf:"):
        return _download_hf(what[3:], out, sha256, timeout)
    source = find(what)
    if source is not None and mirror:
        name = source.url.rpartition("/")[2]
        source = dataclasses.replace(source, url=f"{mirror.rstrip('/')}/{name}")
    elif source is None:
        source = _url_source(what)
    target = out / source.filename
    if target.exists():
        return Downloaded(target, None, False, existed=True)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        return _download_to(source, target, sha256 or source.sha256, timeout, progress)
    except BaseException:
        if created and not any(out.iterdir()):  # a failure leaves no trace but a resumable .part
            out.rmdir()
        raise


def _download_to(source: Source, target: Path, expected: str | None, timeout: float,
                 progress: bool) -> Downloaded:
    part = target.with_name(target.name + ".part")
    resumed = _fetch(source.url, part, timeout, progress, source.name)
    got = sha256_file(part)
    if expected and got != expected:
        part.unlink()
        raise DataError(f"{source.url} does not match its SHA-256 (expected {expected}, got {got}); "
                        "the download was deleted: run the command again to download it afresh")
    _finish(part, target, source.clean)
    return Downloaded(target, got, bool(expected), resumed)


def _url_source(what: str) -> Source:
    parts = urlsplit(what)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise DataError(f"unknown dataset {what!r}: give a name from `minigpt download --list`, an "
                        "http(s) URL or hf:OWNER/NAME")
    name = unquote(parts.path.rstrip("/").rpartition("/")[2]) or parts.netloc
    if name in (".", "..") or "\\" in name:
        raise DataError(f"cannot name a file after {what!r}")
    return Source(name, what, name, None, "?", None, None, what)


def _fetch(url: str, part: Path, timeout: float, progress: bool, name: str) -> int:
    """Bytes of `url` into `part`, resuming after what it already holds; -> bytes resumed."""
    have = part.stat().st_size if part.is_file() else 0
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        resp = urlopen(Request(url, headers=headers), timeout=timeout)  # noqa: S310 - http(s) only
    except HTTPError as e:
        with e:
            if e.code == 416 and have and _whole_size(e.headers.get("Content-Range")) == have:
                return have  # nothing after what we have: the last attempt got every byte
        if e.code == 416:
            part.unlink(missing_ok=True)  # holds more than the file has: not a prefix of it
        raise DataError(f"cannot download {url}: HTTP {e.code} {_phrase(e)}") from None
    except (URLError, OSError, http.client.HTTPException) as e:
        raise _network_error(url, e, timeout, part) from None
    with resp:
        if have and resp.status != 206:
            have = 0  # the server ignores Range: start again from the first byte
        elif have and _range_start(resp.headers.get("Content-Range")) != have:
            raise DataError(f"cannot resume {url}: the server sent another range than asked for "
                            f"({resp.headers.get('Content-Range')}); delete {part} to start over")
        length = resp.headers.get("Content-Length")
        total = have + int(length) if length and length.isdigit() else None
        bar = tqdm(total=total, initial=have, desc=name, unit="B", unit_scale=True,
                   unit_divisor=1024, disable=None if progress else True, file=sys.stderr,
                   dynamic_ncols=True, leave=False)
        # unbuffered: whatever reached the file is exactly a prefix of the download, even when a
        # write fails half-way (a full disk), so the next run can resume from it
        with bar, open(part, "ab" if have else "wb", buffering=0) as f:
            _copy(resp, f, bar, url, timeout, part)
    size = part.stat().st_size
    if total is not None and size != total:
        raise DataError(f"the connection to {urlsplit(url).netloc} closed after {size:,} of "
                        f"{total:,} bytes; {part} is kept: run the same command again to resume")
    return have


def _copy(resp, f, bar: tqdm, url: str, timeout: float, part: Path) -> None:  # noqa: ANN001
    while True:
        try:
            block = resp.read(BLOCK)
        except (OSError, http.client.HTTPException) as e:
            raise _network_error(url, e, timeout, part) from None
        if not block:
            return
        view = memoryview(block)
        while view:
            try:
                n = f.write(view)
            except OSError as e:
                raise DataError(f"cannot write {part}: {e.strerror or e}; the {part.stat().st_size:,} "
                                "bytes downloaded so far are kept there: make room and run the same "
                                "command again to resume") from None
            view = view[n:]
        bar.update(len(block))


def _network_error(url: str, e: BaseException, timeout: float, part: Path) -> DataError:
    reason = e.reason if isinstance(e, URLError) else e
    kept = (f"; {part} is kept ({part.stat().st_size:,} bytes): run the same command again to "
            "resume") if part.is_file() and part.stat().st_size else ""
    if isinstance(reason, TimeoutError):
        return DataError(f"no answer from {urlsplit(url).netloc} for {timeout:g} s (--timeout) "
                         f"while downloading {url}{kept}")
    text = getattr(reason, "strerror", None) or str(reason) or type(reason).__name__
    return DataError(f"cannot download {url}: {text}{kept}")


def _phrase(e: HTTPError) -> str:
    """The standard name of the status (servers word their own reasons differently)."""
    try:
        return HTTPStatus(e.code).phrase
    except ValueError:
        return str(e.reason)


def _range_start(content_range: str | None) -> int | None:
    m = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", (content_range or "").strip())
    return int(m.group(1)) if m else None


def _whole_size(content_range: str | None) -> int | None:
    m = re.fullmatch(r"bytes \*/(\d+)", (content_range or "").strip())
    return int(m.group(1)) if m else None


def _finish(part: Path, target: Path, clean: str | None) -> None:
    """The verified `part` becomes `target`, through its cleaning hook when it has one."""
    if clean is None:
        os.replace(part, target)
    else:
        tmp = target.with_name(f".{target.name}.tmp")
        try:
            CLEANERS[clean](part, tmp)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        part.unlink()
    fsync_dir(target.parent)


def clean_gutenberg(src: Path, dst: Path) -> None:
    """The book without Project Gutenberg's licence header and footer: the lines between the
    `*** START OF ...` and `*** END OF ...` markers, blank lines at either end dropped. A file
    without the markers is kept whole. Line by line, so a file of any size is fine."""
    start = end = None
    with open(src, "rb") as f:
        for i, line in enumerate(f):
            if start is None and _GUTENBERG_START.match(line):
                start = i
            elif start is not None and _GUTENBERG_END.match(line):
                end = i
                break
    if start is None:
        print(f"warning: {src.name} has no Project Gutenberg markers; kept whole", file=sys.stderr)
    with open(src, "rb") as f, open(dst, "wb") as out:
        blank: list[bytes] = []  # blank lines are written only once more text follows them
        wrote = False
        for i, line in enumerate(f):
            if start is not None and i <= start:
                continue
            if end is not None and i >= end:
                break
            if not line.strip():
                blank.append(line)
                continue
            if wrote:
                out.writelines(blank)
            blank, wrote = [], True
            out.write(line)
        out.flush()
        os.fsync(out.fileno())


def unzip_single(src: Path, dst: Path) -> None:
    """The zip member named like the target (or the only member), streamed out."""
    try:
        with zipfile.ZipFile(src) as zf:
            names = [n for n in zf.namelist() if not n.endswith("/")]
            wanted = dst.name.lstrip(".").removesuffix(".tmp")
            member = wanted if wanted in names else names[0] if len(names) == 1 else None
            if member is None:
                raise DataError(f"{src} holds {len(names)} files, none named {wanted}")
            with zf.open(member) as f, open(dst, "wb") as out:
                shutil.copyfileobj(f, out, BLOCK)
                out.flush()
                os.fsync(out.fileno())
    except (zipfile.BadZipFile, EOFError) as e:
        raise DataError(f"{src} is not a valid zip file ({e})") from None


CLEANERS = {"gutenberg": clean_gutenberg, "unzip": unzip_single}


def _download_hf(spec: str, out: Path, sha256: str | None, timeout: float) -> Downloaded:
    """hf:OWNER/NAME (the whole dataset repository) or hf:OWNER/NAME/PATH (one file of it)."""
    parts = spec.strip("/").split("/")
    if len(parts) < 2 or not all(parts[:2]):
        raise DataError(f"expected hf:OWNER/NAME or hf:OWNER/NAME/PATH, got hf:{spec}")
    try:
        import huggingface_hub
    except ImportError:
        raise DataError(f"hf: downloads need huggingface_hub: {DATA_EXTRA}") from None
    repo, path = "/".join(parts[:2]), "/".join(parts[2:])
    if sha256 and not path:
        raise DataError("--sha256 applies to one file: give hf:OWNER/NAME/PATH")
    local_dir = out / parts[1]
    created = not local_dir.exists()
    try:
        if path:
            got = huggingface_hub.hf_hub_download(repo, path, repo_type="dataset",
                                                  local_dir=local_dir, etag_timeout=timeout)
        else:
            # asked first: offline, snapshot_download "succeeds" with whatever local_dir holds
            huggingface_hub.HfApi().repo_info(repo, repo_type="dataset", timeout=timeout)
            got = huggingface_hub.snapshot_download(repo, repo_type="dataset", local_dir=local_dir,
                                                    etag_timeout=timeout)
    except Exception as e:  # the Hub raises its own errors, httpx's and OSError: all one line here
        if created:  # only the Hub's bookkeeping (.cache/) can be in it: nothing was downloaded
            shutil.rmtree(local_dir, ignore_errors=True)
        detail = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise DataError(f"cannot download {repo} from the Hugging Face Hub: {detail}") from None
    result = Path(got)
    if path:
        digest = sha256_file(result)
        if sha256 and digest != sha256:
            result.unlink()
            raise DataError(f"hf:{spec} does not match its SHA-256 (expected {sha256}, got {digest}); "
                            "the download was deleted")
        return Downloaded(result, digest, bool(sha256))
    return Downloaded(result, None, False)
