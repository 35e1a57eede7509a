"""`minigpt download` against a loopback HTTP server standing in for the network: Range resume after
a cut connection gives the exact bytes, a corrupted byte fails the checksum and leaves nothing, a 404,
a server that hangs and a full disk are one line each, and nothing ever sits under the final name
unless it is complete and verified."""

from __future__ import annotations

import hashlib
import http.server
import os
import re
import threading
from pathlib import Path

import pytest

import cli_harness
from conftest import run_cli
from minigpt.data import download as dl
from minigpt.data.catalogue import CATALOGUE
from minigpt.data.corpus import bundled_corpus

BODY = bytes(range(256)) * 800  # 204,800 bytes
SHA = hashlib.sha256(BODY).hexdigest()


class Loopback(http.server.ThreadingHTTPServer):
    """Serves `files` with Range support; `faults[path]` misbehaves once per request as told."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files: dict[str, bytes] = {}
        self.faults: dict[str, list[str]] = {}  # path -> faults, one used up per request
        self.ranges: list[str | None] = []  # the Range header of every request
        self.release = threading.Event()  # a hanging handler waits for this

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"


class _Handler(http.server.BaseHTTPRequestHandler):
    server: Loopback

    def log_message(self, *args) -> None:  # keep pytest's output clean
        pass

    def do_GET(self) -> None:
        srv = self.server
        srv.ranges.append(self.headers.get("Range"))
        fault = srv.faults[self.path].pop(0) if srv.faults.get(self.path) else None
        if fault == "hang":
            srv.release.wait()
            return
        body = srv.files.get(self.path)
        if body is None:
            self.send_error(404, "Not Found")
            return
        if fault == "corrupt":
            body = body[:1000] + bytes([body[1000] ^ 0xFF]) + body[1001:]
        start = int(m.group(1)) if (m := re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")) else 0
        if start >= len(body) and start:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(body)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        if fault is not None and fault.startswith("cut:"):  # promise everything, send a part, hang up
            self.wfile.write(body[start:start + int(fault[4:])])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body[start:])


@pytest.fixture
def server():
    srv = Loopback()
    srv.files["/corpus.txt"] = BODY
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.release.set()
    srv.shutdown()
    srv.server_close()


def minigpt(*args: str, cwd: Path) -> cli_harness.Result:
    return cli_harness.run(["download", *args, "--quiet"], cwd)


def one_line_error(result) -> str:  # noqa: ANN001 - a cli_harness.Result or a CompletedProcess
    assert getattr(result, "rc", getattr(result, "returncode", None)) == 1, result
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("minigpt: error: "), result.stderr
    return lines[0]


def test_a_cut_connection_resumes_with_a_range_request_to_the_exact_bytes(server, tmp_path):
    server.faults["/corpus.txt"] = ["cut:70000"]
    first = minigpt(server.url("/corpus.txt"), "--out", "d", "--sha256", SHA, cwd=tmp_path)
    assert "closed after 70,000 of 204,800 bytes" in one_line_error(first)
    assert not (tmp_path / "d" / "corpus.txt").exists()
    assert (tmp_path / "d" / "corpus.txt.part").read_bytes() == BODY[:70000]

    second = minigpt(server.url("/corpus.txt"), "--out", "d", "--sha256", SHA, cwd=tmp_path)
    assert second.rc == 0, second
    assert server.ranges == [None, "bytes=70000-"]
    assert (tmp_path / "d" / "corpus.txt").read_bytes() == BODY
    assert not (tmp_path / "d" / "corpus.txt.part").exists()
    assert f"resumed at byte 70,000; sha256 {SHA} (verified)" in second.stdout


def test_a_corrupted_byte_fails_the_checksum_and_leaves_nothing(server, tmp_path):
    server.faults["/corpus.txt"] = ["corrupt"]
    result = minigpt(server.url("/corpus.txt"), "--out", "d", "--sha256", SHA, cwd=tmp_path)
    assert f"does not match its SHA-256 (expected {SHA}, got " in one_line_error(result)
    assert not (tmp_path / "d").exists()  # no final name, no .part to resume, no --out it made
    again = minigpt(server.url("/corpus.txt"), "--out", "d", "--sha256", SHA, cwd=tmp_path)
    assert again.rc == 0 and server.ranges[-1] is None  # afresh, not resumed from bad bytes
    assert (tmp_path / "d" / "corpus.txt").read_bytes() == BODY


def test_without_a_pin_the_checksum_is_printed_to_pin_next_time(server, tmp_path):
    result = minigpt(server.url("/corpus.txt"), "--out", "d", cwd=tmp_path)
    assert result.rc == 0 and f"not pinned: pass --sha256 {SHA} to check it" in result.stdout
    again = minigpt(server.url("/corpus.txt"), "--out", "d", cwd=tmp_path)
    assert again.rc == 0 and "already there" in again.stdout and len(server.ranges) == 1


def test_a_404_is_one_line_and_leaves_nothing(server, tmp_path):
    result = minigpt(server.url("/missing.txt"), "--out", "d", cwd=tmp_path)
    assert one_line_error(result) == (f"minigpt: error: cannot download {server.url('/missing.txt')}: "
                                      "HTTP 404 Not Found")
    assert not (tmp_path / "d").exists()


def test_a_server_that_hangs_times_out_in_one_line(server, tmp_path):
    server.faults["/corpus.txt"] = ["hang"]
    try:
        result = minigpt(server.url("/corpus.txt"), "--out", "d", "--timeout", "0.5", cwd=tmp_path)
    finally:
        server.release.set()  # the client has given up; let the handler finish
    line = one_line_error(result)
    assert line.startswith("minigpt: error: no answer from 127.0.0.1:") and "for 0.5 s (--timeout)" in line
    assert not (tmp_path / "d").exists()


def test_a_full_disk_is_one_line_and_no_file_under_the_final_name(server, tmp_path):
    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full to stand in for a full disk")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "corpus.txt.part").symlink_to("/dev/full")  # every write: ENOSPC
    result = minigpt(server.url("/corpus.txt"), "--out", "d", cwd=tmp_path)
    assert "No space left on device" in one_line_error(result)
    assert not (tmp_path / "d" / "corpus.txt").exists()


def test_a_part_file_already_complete_is_finished_without_refetching(server, tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "corpus.txt.part").write_bytes(BODY)  # killed between the last byte and rename
    result = minigpt(server.url("/corpus.txt"), "--out", "d", "--sha256", SHA, cwd=tmp_path)
    assert result.rc == 0, result
    assert server.ranges == [f"bytes={len(BODY)}-"]
    assert (tmp_path / "d" / "corpus.txt").read_bytes() == BODY


def test_list_shows_the_catalogue():
    result = cli_harness.run(["download", "--list"], Path.cwd())
    assert result.rc == 0, result
    for source in CATALOGUE:
        assert source.name in result.stdout and source.licence in result.stdout
    assert "86c4e6aa9db7…" in result.stdout and "not pinned" in result.stdout


def test_the_tiny_shakespeare_pin_is_the_bundled_file():
    pin = next(s for s in CATALOGUE if s.name == "tinyshakespeare")
    data = bundled_corpus().read_bytes()
    assert hashlib.sha256(data).hexdigest() == pin.sha256 and len(data) == pin.size


def test_a_mirror_serves_catalogue_files_and_their_pins_still_apply(server, tmp_path):
    server.files["/input.txt"] = bundled_corpus().read_bytes()  # the upstream file's name
    result = minigpt("tinyshakespeare", "--mirror", server.url(""), "--out", "d", cwd=tmp_path)
    assert result.rc == 0, result
    assert "(verified)" in result.stdout
    assert (tmp_path / "d" / "tinyshakespeare.txt").read_bytes() == bundled_corpus().read_bytes()
    server.files["/input.txt"] = b"not Shakespeare\n"
    result = minigpt("tinyshakespeare", "--mirror", server.url(""), "--out", "e", cwd=tmp_path)
    assert "does not match its SHA-256" in one_line_error(result)
    assert not (tmp_path / "e").exists()


def test_a_catalogue_entry_downloads_through_its_cleaning_hook(server, tmp_path, monkeypatch):
    book = (b"\xef\xbb\xbfThe Project Gutenberg eBook of Alice\r\nlicence text\r\n"
            b"*** START OF THE PROJECT GUTENBERG EBOOK ALICE ***\r\n\r\n\r\nCHAPTER I.\r\n\r\n"
            b"Down the Rabbit-Hole\r\n\r\n*** END OF THE PROJECT GUTENBERG EBOOK ALICE ***\r\nfooter\r\n")
    server.files["/pg11.txt"] = book
    alice = next(s for s in CATALOGUE if s.name == "alice")
    monkeypatch.setattr(dl, "find", lambda name: alice.__class__(
        **{**alice.__dict__, "url": server.url("/pg11.txt"), "sha256": hashlib.sha256(book).hexdigest()}))
    got = dl.download("alice", tmp_path, progress=False)
    assert got.verified and got.path == tmp_path / "alice.txt"
    assert got.path.read_bytes() == b"CHAPTER I.\r\n\r\nDown the Rabbit-Hole\r\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alice.txt"]


@pytest.mark.parametrize("args, message", [
    (["nosuchset"], "unknown dataset 'nosuchset': give a name from `minigpt download --list`, an "
                    "http(s) URL or hf:OWNER/NAME"),
    (["tinyshakespeare", "--sha256", "abc"], "--sha256 must be 64 hexadecimal digits, got 'abc'"),
    (["hf:justaname"], "expected hf:OWNER/NAME or hf:OWNER/NAME/PATH, got hf:justaname"),
])
def test_bad_arguments_are_one_line(tmp_path, args, message):
    assert one_line_error(minigpt(*args, cwd=tmp_path)) == f"minigpt: error: {message}"
    assert list(tmp_path.iterdir()) == []


def test_a_hub_dataset_offline_is_one_line(tmp_path, monkeypatch):
    pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the child sees it: nothing reaches the network
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    for spec in ("hf:roneneldan/TinyStories/TinyStories-valid.txt", "hf:roneneldan/TinyStories"):
        result = run_cli("download", spec, "--out", "d", "--quiet", cwd=tmp_path)
        line = one_line_error(result)
        assert line.startswith("minigpt: error: cannot download roneneldan/TinyStories from the "
                               "Hugging Face Hub: ")
        assert not (tmp_path / "d" / "TinyStories").exists()


def catalogue_table() -> str:
    rows = ["| Name | URL | Size | Licence | SHA-256 | Cleaning |", "|---|---|---|---|---|---|"]
    for s in CATALOGUE:
        size = f"{s.size:,} bytes" if s.size else "not known here"
        sha = f"`{s.sha256}`" if s.sha256 else "not pinned"
        rows.append(f"| `{s.name}` | {s.url} | {size} | {s.licence} | {sha} | {s.clean or '-'} |")
    return "\n".join(rows)


def test_docs_catalogue_table_matches_the_code():
    doc = (Path(__file__).resolve().parents[1] / "docs" / "data.md").read_text(encoding="utf-8")
    table = doc.split("<!-- catalogue:start -->")[1].split("<!-- catalogue:end -->")[0].strip()
    assert table == catalogue_table(), f"docs/data.md is out of date; paste:\n\n{catalogue_table()}\n"
