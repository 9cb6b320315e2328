"""The repository stands alone: nothing it tracks points outside it, and its doc links work.

A user gets this repository and nothing else, so no git-tracked text file may name:
  * a folder beside the checkout, or development notes kept outside the repository (the
    patterns are in FORBIDDEN); their user-facing content lives in `docs/`;
  * an absolute path of a development machine (the home, root and work folders of a
    machine), and any committed temporary path (tests use pytest's `tmp_path`; a
    bare "/tmp" in prose is not a path and is allowed);
  * a development tracker's issue number: describe the thing itself.
A path counts only where it starts a path (after a space, quote, bracket, `=` and so on),
so URLs such as `https://host/home/...` pass. The exceptions are listed in EXCEPTIONS with
a reason each.

And every relative Markdown link in README.md and docs/*.md, and every `docs/*.md` that any
tracked file cites, names a tracked file inside the repository; a link's `#anchor` into a
Markdown file must be one of its headings (GitHub's anchor rules); and README.md links every
page of docs/, so that a reader who starts there can reach all of them.
"""

import os
import re
import subprocess

import pytest

from helpers import REPO


# (name, pattern, why it is not allowed)
FORBIDDEN = [
    ("sibling folder", re.compile(r"\.\./shared\b"),
     "a folder beside the checkout, which users do not have"),
    ("development notes", re.compile(r"\bshared" r"/spec\b"),
     "notes outside the repository: cite docs/ instead"),
    ("development notes", re.compile(r"\b(?:OFFICIAL_CHECKPOINT|ENVIRONMENT|DIFFIT)\.md\b"),
     "notes outside the repository: cite docs/official_checkpoint.md or docs/paper_notes.md"),
    ("machine path", re.compile(r"(?<![\w.~$/-])/(?:work|root|home|Users)/"),
     "an absolute path of a development machine: use a path relative to the repository"),
    ("temporary path", re.compile(r"(?<![\w.~$/-])/tm" r"p/"),
     "a committed temporary path: use tmp_path in tests, a relative path elsewhere"),
    ("issue number", re.compile(r"\bissue #?\d+\b", re.IGNORECASE),
     "a development tracker's issue: describe what it asked for"),
]

# path -> reason it may match FORBIDDEN.
EXCEPTIONS: dict[str, str] = {}  # none: even this file spells its examples in pieces

LINKED_DOCS = re.compile(r"^(?:README\.md|docs/[^/]+\.md)$")
INLINE_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.MULTILINE)
FENCED_CODE = re.compile(r"^\s*(```|~~~).*?^\s*\1", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
CITED_DOC = re.compile(r"(?<![\w./-])docs/[\w.-]+\.md\b")


def tracked_files() -> list[str]:
  try:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True,
                         check=True).stdout
  except (OSError, subprocess.CalledProcessError):
    pytest.skip("not a git checkout (e.g. an unpacked archive): nothing to enumerate")
  return sorted(p for p in out.decode("utf-8").split("\0") if p)


def read_text(path: str) -> str | None:
  """The file's text, or None for a binary, non-UTF-8 or deleted file."""
  try:
    with open(os.path.join(REPO, path), "rb") as f:
      data = f.read()
  except FileNotFoundError:
    return None
  if b"\0" in data:
    return None
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError:
    return None


@pytest.fixture(scope="module")
def texts() -> dict[str, str]:
  files = tracked_files()
  out = {p: t for p in files if (t := read_text(p)) is not None}
  assert "README.md" in out and "setup.py" in out, sorted(out)[:20]
  return out


def test_no_reference_outside_the_repository(texts):
  found = []
  for path, text in texts.items():
    if path in EXCEPTIONS:
      continue
    for lineno, line in enumerate(text.splitlines(), 1):
      for name, pattern, why in FORBIDDEN:
        for m in pattern.finditer(line):
          found.append(f"{path}:{lineno}: {name} {m.group(0)!r} ({why}): {line.strip()[:120]}")
  assert not found, ("tracked files refer to things outside the repository:\n"
                     + "\n".join(found))


def test_exceptions_are_tracked_files(texts):
  stale = [p for p in EXCEPTIONS if p not in texts]
  assert not stale, f"EXCEPTIONS names files that are not tracked text files: {stale}"


def github_anchor(heading: str) -> str:
  """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
  heading = INLINE_CODE.sub(lambda m: m.group(0).strip("`"), heading.strip())
  heading = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
  return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def anchors(text: str) -> set[str]:
  seen: dict[str, int] = {}
  out = set()
  for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", FENCED_CODE.sub("", text), re.MULTILINE):
    slug = github_anchor(m.group(1))
    n = seen.get(slug, 0)
    seen[slug] = n + 1
    out.add(slug if n == 0 else f"{slug}-{n}")
  return out


def markdown_links(text: str) -> list[str]:
  text = INLINE_CODE.sub("", FENCED_CODE.sub("", text))
  return INLINE_LINK.findall(text) + REFERENCE_LINK.findall(text)


def test_markdown_links_resolve(texts):
  tracked = set(texts) | set(tracked_files())
  folders = {os.path.dirname(p) for p in tracked}
  folders |= {os.path.dirname(f) for f in folders}
  docs = [p for p in texts if LINKED_DOCS.match(p)]
  assert "README.md" in docs and "docs/paper_notes.md" in docs, docs
  bad, checked = [], 0
  for path in docs:
    for target in markdown_links(texts[path]):
      if SCHEME.match(target):
        continue  # a URL: not checked offline
      checked += 1
      file_part, _, anchor = target.partition("#")
      if file_part:
        resolved = os.path.normpath(os.path.join(os.path.dirname(path), file_part))
        if resolved == ".." or resolved.startswith("../") or os.path.isabs(file_part):
          bad.append(f"{path}: {target!r} leaves the repository")
          continue
        if resolved not in tracked and resolved.rstrip("/") not in folders:
          bad.append(f"{path}: {target!r} names no tracked file ({resolved})")
          continue
      else:
        resolved = path
      if anchor and resolved.endswith(".md") and anchor not in anchors(texts[resolved]):
        bad.append(f"{path}: {target!r}: {resolved} has no heading with anchor #{anchor}")
  assert not bad, "broken Markdown links:\n" + "\n".join(bad)
  assert checked, "no relative links found: is the link pattern broken?"


def test_the_readme_links_every_docs_page(texts):
  pages = {p for p in texts if re.fullmatch(r"docs/[^/]+\.md", p)}
  linked = {os.path.normpath(t.partition("#")[0]) for t in markdown_links(texts["README.md"])
            if not SCHEME.match(t) and t.partition("#")[0]}
  assert pages, "no docs/*.md pages found"
  missing = sorted(pages - linked)
  assert not missing, f"README.md links none of these docs pages: {missing}"


def test_cited_docs_exist(texts):
  missing = sorted({f"{path}: {m.group(0)}" for path, text in texts.items()
                    for m in CITED_DOC.finditer(text) if m.group(0) not in texts})
  assert not missing, "files cite docs/ pages that do not exist:\n" + "\n".join(missing)


def test_the_rules_catch_what_they_should():
  def flagged(line: str) -> list[str]:
    return [name for name, pattern, _ in FORBIDDEN if pattern.search(line)]

  sibling, notes = "../" + "shared", "shared/" + "spec"  # split: this file must pass too
  assert flagged(f"see `{sibling}/spec/X.md`") == ["sibling folder", "development notes"]
  assert flagged(f"see {notes}/X.md") == ["development notes"]
  assert flagged("layout in " + "ENVIRONMENT" + ".md") == ["development notes"]
  assert flagged('"out_dir": "/' + 'work/main/experiments/results"') == ["machine path"]
  assert flagged("Run: cd /" + "home/me/diffit && python x.py") == ["machine path"]
  assert flagged("--workdir=/" + "tmp/run1") == ["temporary path"]
  assert flagged("speed targets (" + "issue" + " 8)") == ["issue number"]
  for fine in ("https://github.com/home/repo", "not a world-writable /tmp path",
               "docs/official_checkpoint.md", "/content/drive/MyDrive", "~/work/x",
               "tmp_path / 'a'", "$HOME/x", "experiments/results"):
    assert flagged(fine) == [], fine
  assert github_anchor("FLOPs: the paper's 114 G is not reproducible") == (
      "flops-the-papers-114-g-is-not-reproducible")
  assert github_anchor("Tensor names and shapes") == "tensor-names-and-shapes"
  assert markdown_links("[a](x.md#b) `[c](y.md)` [d](https://e)\n[f]: g/h.md\n") == [
      "x.md#b", "https://e", "g/h.md"]
