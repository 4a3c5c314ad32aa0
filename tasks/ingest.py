"""Ingest stage: scan a source folder, parse documents into pages, plan the delta against the registry.

Everything here is a plain function over plain data. A file that cannot be used is *quarantined*
with a reason (never fatal to the run); the flow records those in the registry.

One file (~490 lines): one reader per format and the quarantine rules they share; splitting by format
would spread the one rule for what is quarantined.
"""

from __future__ import annotations

import io
import logging
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

from storage.records import sha256_file
from tasks.chunking import Page
from tasks.text import normalize_whitespace

log = logging.getLogger(__name__)

KINDS: dict[str, str] = {
    ".pdf": "pdf",
    ".md": "markdown",
    ".markdown": "markdown",
    ".txt": "text",
    ".text": "text",
    ".html": "html",
    ".htm": "html",
}


@dataclass(frozen=True)
class SourceFile:
    path: Path  # absolute path under the source root (symlinks not resolved)
    rel_path: str  # POSIX path relative to the root
    sha256: str
    size: int
    kind: str  # one of KINDS' values


@dataclass(frozen=True)
class Quarantined:
    path: Path
    sha256: str | None
    reason: str


@dataclass
class ScanResult:
    files: list[SourceFile] = field(default_factory=list)
    rejected: list[Quarantined] = field(default_factory=list)


@dataclass
class ParsedDocument:
    pages: list[Page]
    title: str


class ParseError(Exception):
    """A document that cannot be used; `reason` is stored with the quarantined document."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def scan_source(root: Path, max_file_mb: float) -> ScanResult:
    """Find the documents under `root` (recursively; a single file is also accepted).

    Known extensions only (others are ignored, not quarantined); hidden files and folders are
    skipped. Symlinks that resolve outside the root and files over `max_file_mb` are quarantined.
    """
    root = Path(root).expanduser().absolute()
    real_root = root.resolve()
    limit = int(max_file_mb * 1024 * 1024)
    result = ScanResult()
    if not root.exists():
        raise FileNotFoundError(f"source {root} does not exist")

    def inside(p: Path) -> bool:
        resolved = p.resolve()
        return resolved == real_root or real_root in resolved.parents

    def consider(path: Path, rel: str) -> None:
        kind = KINDS.get(path.suffix.lower())
        if kind is None:
            return
        if path.is_symlink() and not inside(path):
            result.rejected.append(Quarantined(path, None, "symlink escapes source root"))
            return
        try:
            if not path.is_file():
                return  # dangling symlink, fifo, ...
            size = path.stat().st_size
            if size > limit:
                reason = f"file too large: {size / 2**20:.1f} MB > {max_file_mb} MB"
                result.rejected.append(Quarantined(path, None, reason))
                return
            result.files.append(SourceFile(path, rel, sha256_file(path), size, kind))
        except OSError as exc:
            result.rejected.append(Quarantined(path, None, f"unreadable: {exc.strerror or exc}"))

    if root.is_file():
        real_root = root.resolve().parent
        consider(root, root.name)
        return result

    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        base = Path(dirpath)
        for d in list(dirnames):
            sub = base / d
            if d.startswith("."):
                dirnames.remove(d)
            elif sub.is_symlink():
                # os.walk does not descend into linked folders; one pointing outside is reported,
                # one pointing inside is walked anyway under its real path.
                if not inside(sub):
                    result.rejected.append(Quarantined(sub, None, "symlink escapes source root"))
        for name in filenames:
            if not name.startswith("."):
                path = base / name
                consider(path, path.relative_to(root).as_posix())
    result.files.sort(key=lambda f: f.rel_path)
    result.rejected.sort(key=lambda q: str(q.path))
    return result


# --------------------------------------------------------------------------------------------------
# Parsing


_PREFERRED_CODEPAGES = ("cp1252", "latin_1", "iso8859_15")


def decode_text(data: bytes) -> str:
    """Decode bytes: BOMs first (UTF-8/16/32), then strict UTF-8, then charset_normalizer's guess."""
    boms = (
        (b"\xef\xbb\xbf", "utf-8-sig"),
        (b"\xff\xfe\x00\x00", "utf-32"),
        (b"\x00\x00\xfe\xff", "utf-32"),
        (b"\xff\xfe", "utf-16"),
        (b"\xfe\xff", "utf-16"),
    )
    for bom, enc in boms:
        if data.startswith(bom):
            try:
                return data.decode(enc)
            except UnicodeDecodeError as exc:
                raise ParseError(f"undecodable text: bad {enc}: {exc.reason}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        from charset_normalizer import from_bytes

        matches = from_bytes(data)
        best = matches.best()
        if best is None:
            raise ParseError("undecodable text: no plausible character encoding") from None
        # Single-byte code pages often tie (cp1250 and cp1252 both "decode" Western text, ø -> ř);
        # among equally plausible guesses take the most common one in practice.
        tied = {m.encoding: m for m in matches if (m.chaos, m.coherence) == (best.chaos, best.coherence)}
        best = next((tied[e] for e in _PREFERRED_CODEPAGES if e in tied), best)
        text = str(best)
    # Binary that happens to decode: many control characters means it is not text.
    controls = sum(1 for ch in text if ord(ch) < 32 and ch not in "\n\r\t\f")
    if text and controls / len(text) > 0.05:
        raise ParseError("undecodable text: looks binary (control characters)")
    return text


def _parse_pdf(data: bytes, max_pages: int) -> tuple[list[Page], str | None]:
    from pypdf import PdfReader

    if b"%PDF-" not in data[:1024]:
        raise ParseError("not a PDF: missing %PDF header")
    try:
        reader = PdfReader(io.BytesIO(data), strict=False)
        if reader.is_encrypted:
            try:
                ok = reader.decrypt("")  # many "protected" PDFs only restrict printing/copying
            except Exception as exc:  # e.g. AES without the `cryptography` package
                raise ParseError(f"encrypted PDF: cannot decrypt ({exc})") from None
            if not ok:
                raise ParseError("encrypted PDF: password required")
        n_pages = len(reader.pages)
    except ParseError:
        raise
    except Exception as exc:
        raise ParseError(f"corrupt PDF: {type(exc).__name__}: {exc}") from None
    if n_pages == 0:
        raise ParseError("corrupt PDF: no pages")
    if n_pages > max_pages:
        raise ParseError(f"too many pages: {n_pages} > {max_pages}")
    pages = []
    for i, page in enumerate(reader.pages, start=1):
        try:
            text = page.extract_text() or ""
        except Exception as exc:
            raise ParseError(f"corrupt PDF: page {i}: {type(exc).__name__}: {exc}") from None
        pages.append(Page(i, normalize_whitespace(text)))
    if not any(p.text for p in pages):
        raise ParseError("no extractable text (image-only or scanned PDF)")
    try:
        title = (reader.metadata.title or "").strip() if reader.metadata else ""
    except Exception:  # a broken info dictionary only costs the title
        title = ""
    return pages, title or None


_MD_RULES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"\A---\n.*?\n---\n", re.S), ""),  # YAML front matter
    (re.compile(r"<!--.*?-->", re.S), ""),  # HTML comments
    (re.compile(r"!\[([^\]]*)\]\([^)]*\)"), r"\1"),  # images -> alt text
    (re.compile(r"\[([^\]]+)\]\([^)]*\)"), r"\1"),  # links -> link text
    (re.compile(r"\[([^\]]+)\]\[[^\]]*\]"), r"\1"),  # reference links
    (re.compile(r"^\s{0,3}\[[^\]]+\]:\s+\S+.*$", re.M), ""),  # link definitions
    (re.compile(r"^\s{0,3}#{1,6}\s+(.*?)\s*#*\s*$", re.M), r"\1"),  # ATX headings -> text
    (re.compile(r"^\s{0,3}(?:=+|-+)\s*$", re.M), ""),  # setext underlines / rules
    (re.compile(r"^\s{0,3}>\s?", re.M), ""),  # block quotes
    (re.compile(r"^\s*(?:[-*+]|\d+[.)])\s+", re.M), ""),  # list markers
    (re.compile(r"(\*\*|__)(.+?)\1"), r"\2"),  # bold
    (re.compile(r"(?<![\w*])([*_])(?!\s)(.+?)(?<!\s)\1(?![\w*])"), r"\2"),  # italics
    (re.compile(r"`([^`\n]+)`"), r"\1"),  # inline code
    (re.compile(r"</?[a-zA-Z][^>]*>"), ""),  # inline HTML tags
    (re.compile(r"^\s*\|?(?:\s*:?-{2,}:?\s*\|)+\s*:?-*:?\s*$", re.M), ""),  # table separators
    (re.compile(r"\s*\|\s*"), " | "),  # table cells
]
_FENCE = re.compile(r"^(\s{0,3})(```|~~~)[^\n]*\n(.*?)^\1\2\s*$", re.S | re.M)


def markdown_to_text(md: str) -> tuple[str, str | None]:
    """Strip Markdown lightly: headings, links and emphasis become plain text; fenced code is kept
    verbatim (without the fences). Returns (text, first heading or None)."""
    heading = re.search(r"^\s{0,3}#{1,6}\s+(.+?)\s*#*\s*$", md, re.M)
    blocks: list[str] = []

    def stash(m: re.Match[str]) -> str:
        blocks.append(m.group(3).rstrip("\n"))
        return f"\n\x00CODE{len(blocks) - 1}\x00\n"

    text = _FENCE.sub(stash, md.replace("\r\n", "\n"))
    for pattern, repl in _MD_RULES:
        text = pattern.sub(repl, text)
    text = re.sub(r"\x00CODE(\d+)\x00", lambda m: blocks[int(m.group(1))], text)
    return text, (heading.group(1).strip() if heading else None)


_DISPLAY_NONE = re.compile(
    r"(?:^|;)\s*(?:display\s*:\s*none|visibility\s*:\s*hidden)\s*(?:!important\s*)?(?:;|$)", re.I
)
_VOID = frozenset("area base br col embed hr img input link meta source track wbr".split())
#: Elements whose end tag may be left out, and the start tags that close them implicitly.
_CLOSED_BY_SIBLING = {
    "li": {"li"}, "dt": {"dt", "dd"}, "dd": {"dt", "dd"}, "option": {"option", "optgroup"},
    "tr": {"tr", "tbody", "tfoot"}, "td": {"td", "th", "tr", "tbody", "tfoot"},
    "th": {"td", "th", "tr", "tbody", "tfoot"}, "thead": {"tbody", "tfoot"}, "tbody": {"tbody", "tfoot"},
}  # fmt: skip
_CLOSES_P = frozenset(
    "address article aside blockquote details div dl fieldset figcaption figure footer form h1 h2 h3 "
    "h4 h5 h6 header hr main menu nav ol p pre section table ul".split()
)


def _is_hidden(attrs: list[tuple[str, str | None]]) -> bool:
    """An element a reader never sees: ``hidden``, ``aria-hidden="true"``, or an inline style with
    ``display:none`` / ``visibility:hidden`` (text planted for machines, not knowledge). Hiding by a
    stylesheet class, ``opacity:0`` or ``font-size:0`` is not detected."""
    for name, value in attrs:
        name, value = name.lower(), (value or "").strip()
        if name == "hidden" and value.lower() != "until-found":
            return True
        if name == "aria-hidden" and value.lower() == "true":
            return True
        if name == "style" and _DISPLAY_NONE.search(value):
            return True
    return False


class _HTMLText(HTMLParser):
    """Visible text of an HTML page with line breaks at block elements: scripts, styles, comments and
    hidden elements (``hidden``, ``aria-hidden``, inline ``display:none``) are left out."""

    BLOCK = frozenset(
        "p div br li ul ol h1 h2 h3 h4 h5 h6 tr table section article header footer pre blockquote hr "
        "title dt dd main nav aside figure figcaption form".split()
    )
    SKIP = frozenset("script style noscript template svg head".split())

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip_depth = 0
        self.title: str | None = None
        self.h1: str | None = None
        self._capture: str | None = None
        self._buf: list[str] = []
        self._open: list[str] = []  # open elements (void ones never pushed)
        self._hidden_at: int | None = None  # depth of the outermost open hidden element

    def _close_implied(self, tag: str) -> None:
        """End tags HTML lets authors leave out: a new <li> closes the open <li>, a block closes an
        open <p>, and so on (enough of the spec for hiding not to swallow a page)."""
        while self._open:
            top = self._open[-1]
            if (top in _CLOSED_BY_SIBLING and tag in _CLOSED_BY_SIBLING[top]) or (
                top == "p" and tag in _CLOSES_P
            ):
                self._pop_to(len(self._open) - 1)
            else:
                return

    def _pop_to(self, depth: int) -> None:
        del self._open[depth:]
        if self._hidden_at is not None and len(self._open) < self._hidden_at:
            self._hidden_at = None

    @property
    def _hidden(self) -> bool:
        return self._hidden_at is not None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._close_implied(tag)
        if tag not in _VOID:
            self._open.append(tag)
            if self._hidden_at is None and _is_hidden(attrs):
                self._hidden_at = len(self._open)
        if tag in self.SKIP and tag != "head":
            self.skip_depth += 1
        if tag in ("title", "h1") and self._capture is None:
            self._capture, self._buf = tag, []
        if tag in self.BLOCK:
            self.parts.append("\n\n" if tag in ("p", "h1", "h2", "h3", "h4", "h5", "h6") else "\n")
        elif tag in ("td", "th"):
            self.parts.append(" ")

    def handle_endtag(self, tag: str) -> None:
        if tag in self._open:  # close it and whatever was left open inside it
            self._pop_to(len(self._open) - 1 - self._open[::-1].index(tag))
        if tag in self.SKIP and tag != "head" and self.skip_depth:
            self.skip_depth -= 1
        if tag == self._capture:
            value = " ".join("".join(self._buf).split()) or None
            if tag == "title":
                self.title = self.title or value
            else:
                self.h1 = self.h1 or value
            self._capture = None
        if tag in self.BLOCK:
            self.parts.append("\n\n" if tag in ("p", "h1", "h2", "h3", "h4", "h5", "h6") else "\n")

    def handle_data(self, data: str) -> None:
        if self._capture and not self._hidden:
            self._buf.append(data)
        if self.skip_depth or self._hidden or self._capture == "title":
            return  # the <title> is metadata, not body text
        self.parts.append(data)


def html_to_text(html: str) -> tuple[str, str | None]:
    """(visible text, title from <title> or the first <h1>) of an HTML document."""
    parser = _HTMLText()
    parser.feed(html)
    parser.close()
    # Inline whitespace in HTML is not significant: collapse it per line, keep block breaks.
    text = "".join(parser.parts)
    text = "\n".join(" ".join(line.split()) for line in text.split("\n"))
    return text, parser.title or parser.h1


def parse_document(file: SourceFile, max_pdf_pages: int) -> ParsedDocument:
    """Pages of text and a title for one source file; raises ParseError with a reason."""
    try:
        data = Path(file.path).read_bytes()
    except OSError as exc:
        raise ParseError(f"unreadable: {exc.strerror or exc}") from None
    if not data.strip():
        raise ParseError("empty document")
    stem_title = Path(file.rel_path).stem.replace("_", " ").replace("-", " ").strip()
    title: str | None
    if file.kind == "pdf":
        pages, title = _parse_pdf(data, max_pdf_pages)
    else:
        raw = decode_text(data)
        if file.kind == "markdown":
            text, title = markdown_to_text(raw)
        elif file.kind == "html":
            text, title = html_to_text(raw)
        else:
            text, title = raw, None
        pages = [Page(1, normalize_whitespace(text))]
    if not any(p.text for p in pages):
        raise ParseError("empty document")
    if not title:
        first = next((p.text for p in pages if p.text), "").split("\n", 1)[0].strip()
        title = first if file.kind == "text" and 0 < len(first) <= 120 else stem_title
    return ParsedDocument(pages, title or stem_title)


# --------------------------------------------------------------------------------------------------
# Delta against the registry


@dataclass(frozen=True)
class Renamed:
    file: SourceFile
    old_path: str


@dataclass(frozen=True)
class Changed:
    file: SourceFile
    old_sha256: str  # the content this path had: retire it


@dataclass(frozen=True)
class Deleted:
    path: str
    sha256: str


@dataclass
class Delta:
    new: list[SourceFile] = field(default_factory=list)
    unchanged: list[SourceFile] = field(default_factory=list)
    renamed: list[Renamed] = field(default_factory=list)
    changed: list[Changed] = field(default_factory=list)
    deleted: list[Deleted] = field(default_factory=list)
    duplicates: list[SourceFile] = field(default_factory=list)  # same bytes as another scanned file

    @property
    def to_process(self) -> list[SourceFile]:
        """Files whose content must be parsed, chunked and turned into QA pairs."""
        return self.new + [c.file for c in self.changed]


def plan_delta(
    files: Iterable[SourceFile],
    known: Mapping[str, str],
    active_paths: Mapping[str, str],
) -> Delta:
    """Compare a scan with the registry. Pure function; paths are `str(SourceFile.path)`.

    known: sha256 -> current path of every document the registry knows (any status);
    active_paths: path -> sha256 of the active documents.
    - same path, same sha as active -> unchanged; same path, other sha -> changed (retire the old sha),
      unless the old sha still exists elsewhere in the scan (it moved: that file is the rename, this
      one is new);
    - known sha at another path that is gone from the scan -> renamed; at the same path -> unchanged
      (e.g. a quarantined file: same bytes fail the same way, no retry);
    - a second file with the same bytes in one scan -> duplicates (first by rel_path wins);
    - active path gone and its sha nowhere in the scan -> deleted.
    """
    files = sorted(files, key=lambda f: f.rel_path)
    by_path = {str(f.path): f for f in files}
    scanned_shas = {f.sha256 for f in files}
    delta = Delta()
    claimed: set[str] = set()  # shas already assigned to a file of this scan
    # First pass: files that sit exactly where the registry expects their content.
    for f in files:
        p = str(f.path)
        if active_paths.get(p) == f.sha256 or (p not in active_paths and known.get(f.sha256) == p):
            delta.unchanged.append(f)
            claimed.add(f.sha256)
    done = {str(f.path) for f in delta.unchanged}
    for f in files:
        p = str(f.path)
        if p in done:
            continue
        if f.sha256 in claimed:
            delta.duplicates.append(f)
            continue
        claimed.add(f.sha256)
        old_sha = active_paths.get(p)
        if old_sha is not None and old_sha not in scanned_shas:
            delta.changed.append(Changed(f, old_sha))
        elif f.sha256 in known:
            old_path = known[f.sha256]
            old_file = by_path.get(old_path)
            if old_file is not None and old_file.sha256 == f.sha256:
                delta.duplicates.append(f)  # a copy; the original is still in place
            else:
                delta.renamed.append(Renamed(f, old_path))
        else:
            delta.new.append(f)
    for p, sha in sorted(active_paths.items()):
        if p not in by_path and sha not in scanned_shas:
            delta.deleted.append(Deleted(p, sha))
    return delta
