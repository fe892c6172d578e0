"""The benchmarks' conversations: questions and answers made from the manual pages installed here.

Every English manual page of sections 1, 5 and 8 under /usr/share/man gives a few conversations,
each answer text of the page (nobody here wrote it): what the command is for (its NAME line),
what it does (the first paragraph of its DESCRIPTION), and what some of its options do (an
option and its description), the last two as a second turn after the first where the page has
them. Held out are whole pages (every HOLDOUT_EVERY-th by name), so no answer of a held-out page
is ever trained on.
"""

from __future__ import annotations

import gzip
import re
from pathlib import Path

MAN = Path("/usr/share/man")
SECTIONS = ("man1", "man5", "man8")
HOLDOUT_EVERY = 10
MAX_ANSWER = 600  # characters of a paragraph kept as an answer

_FONT = re.compile(r"\\f(\[[^\]]*\]|\(..|.)")
_ESCAPES = {r"\-": "-", r"\(aq": "'", r"\(dq": '"', r"\(em": "--", r"\(en": "-", r"\(bu": "*", r"\e": "\\",
            r"\&": "", r"\,": "", r"\/": "", r"\|": "", r"\^": "", r"\ ": " ", r"\(co": "(c)", r"\(lq": '"', r"\(rq": '"'}


FONT_REQUESTS = (".B ", ".I ", ".BR ", ".BI ", ".IR ", ".RB ", ".RI ", ".IB ")


def _text_line(line: str) -> bool:
    """Whether a troff line carries text: plain text, or a font request with its words."""
    return not line.startswith((".", "'")) or line.startswith(FONT_REQUESTS)


def _plain(line: str) -> str:
    line = _FONT.sub("", line)
    for escape, text in _ESCAPES.items():
        line = line.replace(escape, text)
    line = re.sub(r"\\\*\(..|\\\*\[[^\]]*\]|\\\*.|\\[a-zA-Z]", "", line)
    if line.startswith(FONT_REQUESTS):
        line = line.split(" ", 1)[1].replace('"', "")
    return line.strip()


def _sections(text: str) -> dict[str, list[str]]:
    """Section name -> its lines (troff requests kept, for paragraph and option structure)."""
    out: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        if line.startswith((".SH", ".Sh")):
            current = line[3:].strip().strip('"').upper()
            out[current] = []
        elif current is not None and not line.startswith(('.\\"', "'\\\"")):
            out[current].append(line)
    return out


def _paragraphs(lines: list[str]) -> list[str]:
    paragraphs, words = [], []
    for line in lines:
        if not _text_line(line):
            if line.startswith((".PP", ".P ", ".LP", ".TP", ".IP", ".SS", ".sp", ".Pp")) or line.strip() == ".P":
                if words:
                    paragraphs.append(" ".join(words))
                words = []
            continue
        text = _plain(line)
        if text:
            words.append(text)
    if words:
        paragraphs.append(" ".join(words))
    return paragraphs


def _options(lines: list[str]) -> list[tuple[str, str]]:
    """(option, what it does) from .TP entries: the line after .TP, then the text until the next request."""
    out = []
    for i, line in enumerate(lines):
        if line.startswith(".TP") and i + 2 < len(lines):
            tag = _plain(lines[i + 1])
            body = []
            for following in lines[i + 2:]:
                if not _text_line(following):
                    break
                body.append(_plain(following))
            if tag.startswith("-") and body and len(tag) < 40:
                out.append((tag, " ".join(body)))
    return out


def _sentence(text: str) -> str:
    text = re.sub(r"\s+", " ", text).strip()
    if len(text) > MAX_ANSWER:
        cut = text[:MAX_ANSWER].rfind(". ")
        text = text[: cut + 1] if cut > 40 else text[:MAX_ANSWER]
    return text[:1].upper() + text[1:] + ("" if text.endswith((".", "!", "?", ":")) else ".")


def page_conversations(path: Path) -> list[dict]:
    """The conversations of one manual page ({"messages": [...]}); none for a page without a NAME line."""
    try:
        text = gzip.decompress(path.read_bytes()).decode("utf-8", errors="replace")
    except (OSError, EOFError):
        return []
    sections = _sections(text)
    name_lines = [_plain(line) for line in sections.get("NAME", []) if _text_line(line)]
    name_line = " ".join(l for l in name_lines if l)
    if " - " not in name_line:
        return []
    names, what = name_line.split(" - ", 1)
    command = names.split(",")[0].strip()
    if not command or not what.strip():
        return []
    first = [{"role": "user", "content": f"What is {command} for?"}, {"role": "assistant", "content": _sentence(what)}]
    conversations = [{"messages": first}]
    description = [p for p in _paragraphs(sections.get("DESCRIPTION", [])) if len(p) > 40]
    if description:
        conversations.append({"messages": first + [{"role": "user", "content": f"Tell me more about {command}."},
                                                   {"role": "assistant", "content": _sentence(description[0])}]})
    for option, does in _options(sections.get("OPTIONS", []) + sections.get("DESCRIPTION", []))[:3]:
        conversations.append({"messages": [
            {"role": "system", "content": "You answer questions about Unix commands in a sentence or two."},
            {"role": "user", "content": f"What does the {option} option of {command} do?"},
            {"role": "assistant", "content": _sentence(does)}]})
    return conversations


def manpage_pages() -> list[Path]:
    pages = sorted(p for section in SECTIONS for p in (MAN / section).glob("*.gz"))
    if not pages:
        raise SystemExit(f"no manual pages under {MAN}/{{{','.join(SECTIONS)}}}: install man-db and manpages")
    return pages


def manpage_split(max_pages: int | None = None) -> tuple[list[dict], list[dict]]:
    """(train, held-out) conversations, held-out being those of every HOLDOUT_EVERY-th page."""
    train, heldout = [], []
    for i, page in enumerate(manpage_pages()[:max_pages]):
        (heldout if i % HOLDOUT_EVERY == 0 else train).extend(page_conversations(page))
    return train, heldout
