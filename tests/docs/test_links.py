"""Every relative link and #anchor in the repository's Markdown resolves.

README.md, docs/*.md and every other README point at each other's sections;
a moved or renamed heading must fail here, not on GitHub. Anchors follow
GitHub's rules for headings: the heading's text, lower-cased, with every
character that is not a letter, digit, space, '-' or '_' removed and each
space turned into '-'; a repeated slug gets '-1', '-2', ... Links that leave
the repository (DESIGN.md in the project's shared folder) cannot be checked
from a clone and are skipped; so are URLs.

That every configuration key and every error reason is in the reference
docs is checked by the Rust unit tests beside the parser and the reason table
(config::tests, error::tests): they read the lists from the code itself.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

FENCE = re.compile(r"^(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
INLINE_CODE = re.compile(r"`+[^`]*`+")
# [text](target "title") and ![alt](target); text may hold brackets of its own.
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$")
EXPLICIT_ANCHOR = re.compile(r"""<a\s+(?:name|id)=["']([^"']+)["']""")


def markdown_files() -> list[Path]:
    """The Markdown files git tracks, or would (new and not ignored)."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.md"],
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    return sorted({REPO / name for name in listed if (REPO / name).is_file()})


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks."""
    lines, fenced = [], False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line.strip()):
            fenced = not fenced
            continue
        if not fenced:
            lines.append((number, line))
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading's Markdown text."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links: their text
    text = text.replace("`", "")
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor a Markdown file defines."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    for _, line in prose_lines(path.read_text(encoding="utf-8")):
        found.update(EXPLICIT_ANCHOR.findall(line))
        heading = HEADING.match(line)
        if not heading:
            continue
        base = slug(heading.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(path: Path) -> list[tuple[int, str]]:
    """(line number, target) of every link outside code."""
    out = []
    for number, line in prose_lines(path.read_text(encoding="utf-8")):
        line = INLINE_CODE.sub("", line)
        out.extend((number, target) for target in LINK.findall(line))
        reference = REFERENCE.match(line)
        if reference:
            out.append((number, reference.group(1)))
    return out


def broken_links(path: Path) -> list[str]:
    problems = []
    for number, target in links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path
        where = f"{path.relative_to(REPO)}:{number}: {target}"
        if REPO not in resolved.parents and resolved != REPO:
            continue  # outside the repository: not checkable from a clone
        if not resolved.exists():
            problems.append(f"{where}: no such file")
            continue
        if anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            problems.append(f"{where}: no heading with that anchor in {resolved.relative_to(REPO)}")
    return problems


def test_every_relative_link_and_anchor_resolves():
    files = markdown_files()
    assert REPO / "README.md" in files and any(f.parent == REPO / "docs" for f in files)
    problems = [p for f in files for p in broken_links(f)]
    assert not problems, "broken links:\n" + "\n".join(problems)


@pytest.mark.parametrize(
    ("heading", "anchor"),
    [
        ("`[server]`", "server"),
        ("`[[callers]]`", "callers"),
        ("Retrying safely: `request_id`", "retrying-safely-request_id"),
        ("What credgate requires of Redis/Valkey", "what-credgate-requires-of-redisvalkey"),
        ("Validating the manifests (no cluster needed)", "validating-the-manifests-no-cluster-needed"),
        ("Who may call, and as whom", "who-may-call-and-as-whom"),
        ("A — B", "a--b"),
    ],
)
def test_anchors_follow_githubs_rules(heading, anchor):
    assert slug(heading) == anchor


def test_a_broken_anchor_and_a_missing_file_are_reported(tmp_path, monkeypatch):
    """The checker itself can fail: a link to a missing heading or file."""
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    (tmp_path / "a.md").write_text("# Title\n\n## Two words\n\n## Two words\n")
    (tmp_path / "b.md").write_text(
        "[ok](a.md#two-words) [dup](a.md#two-words-1) [self](#here)\n"
        "# Here\n"
        "[bad](a.md#three-words) [gone](missing.md) `[code](nowhere.md)`\n"
        "```\n[fenced](nowhere.md)\n```\n"
    )
    problems = broken_links(tmp_path / "b.md")
    assert len(problems) == 2, problems
    assert "a.md#three-words" in problems[0] and "missing.md" in problems[1]
