"""The built-in catalogue of downloadable corpora: one table of name, URL, size, licence, SHA-256
and cleaning hook, which `minigpt download --list` prints and docs/data.md repeats.

A checksum is pinned only where it was computed here from the very bytes the URL serves: Tiny
Shakespeare's equals the bundled copy's. The others could not be fetched from this machine (it has
no internet), and Project Gutenberg rewrites its headers from time to time, so they are "not pinned":
the download prints the SHA-256 it got, and `--sha256 HEX` verifies it. Sizes are the upstream
file's when known, else None; no number here is a guess.
"""

from __future__ import annotations

from dataclasses import dataclass

_GUTENBERG = "https://www.gutenberg.org/cache/epub/{n}/pg{n}.txt"
_GUTENBERG_LICENCE = "public domain in the USA (Project Gutenberg licence)"
_TINYSTORIES = "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/{f}"


@dataclass(frozen=True)
class Source:
    name: str
    url: str
    filename: str  # the name it is saved under in --out
    size: int | None  # bytes the URL serves, when known
    licence: str
    sha256: str | None  # of the bytes the URL serves; None = not pinned
    clean: str | None  # a cleaning hook of download.py, applied after the checksum
    about: str


CATALOGUE: tuple[Source, ...] = (
    Source("tinyshakespeare",
           "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
           "tinyshakespeare.txt", 1_115_394, "public domain (Shakespeare)",
           "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed", None,
           "40,000 lines of Shakespeare (char-rnn); the same bytes as the bundled copy"),
    Source("shakespeare", _GUTENBERG.format(n=100), "shakespeare.txt", None, _GUTENBERG_LICENCE,
           None, "gutenberg", "The Complete Works of William Shakespeare (Gutenberg #100)"),
    Source("pride-and-prejudice", _GUTENBERG.format(n=1342), "pride-and-prejudice.txt", None,
           _GUTENBERG_LICENCE, None, "gutenberg", "Jane Austen, Pride and Prejudice (Gutenberg #1342)"),
    Source("alice", _GUTENBERG.format(n=11), "alice.txt", None, _GUTENBERG_LICENCE, None,
           "gutenberg", "Lewis Carroll, Alice's Adventures in Wonderland (Gutenberg #11)"),
    Source("frankenstein", _GUTENBERG.format(n=84), "frankenstein.txt", None, _GUTENBERG_LICENCE,
           None, "gutenberg", "Mary Shelley, Frankenstein (Gutenberg #84)"),
    Source("moby-dick", _GUTENBERG.format(n=2701), "moby-dick.txt", None, _GUTENBERG_LICENCE, None,
           "gutenberg", "Herman Melville, Moby-Dick (Gutenberg #2701)"),
    Source("tinystories", _TINYSTORIES.format(f="TinyStoriesV2-GPT4-train.txt"),
           "tinystories-train.txt", None, "CDLA-Sharing-1.0", None, None,
           "TinyStories V2 (GPT-4 stories), training file, a few GB; stories end with a "
           "<|endoftext|> line"),
    Source("tinystories-valid", _TINYSTORIES.format(f="TinyStoriesV2-GPT4-valid.txt"),
           "tinystories-valid.txt", None, "CDLA-Sharing-1.0", None, None,
           "TinyStories V2 (GPT-4 stories), validation file, tens of MB"),
    Source("enwik8", "http://mattmahoney.net/dc/enwik8.zip", "enwik8", None,
           "Wikipedia text: CC BY-SA", None, "unzip",
           "the first 100,000,000 bytes of an English Wikipedia XML dump (Hutter Prize)"),
)


def find(name: str) -> Source | None:
    return next((s for s in CATALOGUE if s.name == name.lower()), None)


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"


def format_catalogue() -> str:
    """The table `minigpt download --list` prints."""
    rows = [("name", "size", "sha256", "licence", "what")]
    for s in CATALOGUE:
        pin = s.sha256[:12] + "…" if s.sha256 else "not pinned"
        rows.append((s.name, _size(s.size), pin, s.licence, s.about))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4] for r in rows]
    lines.append("also: any http(s) URL, and Hugging Face datasets as hf:OWNER/NAME "
                 "(or hf:OWNER/NAME/PATH for one file)")
    return "\n".join(lines)
