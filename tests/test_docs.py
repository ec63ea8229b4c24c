"""The documentation: generated pages current, links that resolve, a README of at most 300 lines, and the Python API
page's example running and printing what the page says."""

import contextlib
import glob
import importlib
import importlib.util
import io
import os
import re
import tempfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README_MAX_LINES = 300


def _make_docs():
  spec = importlib.util.spec_from_file_location("make_docs", os.path.join(REPO, "scripts", "make_docs.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _read(path: str) -> str:
  with open(os.path.join(REPO, path), encoding="utf-8") as f:
    return f.read()


def _pages() -> list[str]:
  """README.md, CHANGELOG.md and every page of docs/, relative to the repository."""
  return ["README.md", "CHANGELOG.md"] + sorted(os.path.relpath(p, REPO) for p in glob.glob(f"{REPO}/docs/*.md"))


@pytest.mark.fast
def test_generated_pages_are_current():
  stale = [path for path, text in _make_docs().pages().items()
           if not os.path.exists(os.path.join(REPO, path)) or _read(path) != text]
  assert not stale, f"{', '.join(stale)} differ from what the code makes now: run `python scripts/make_docs.py`."


def _links(text: str) -> list[str]:
  """The targets of a page's Markdown links and images, outside code blocks and inline code."""
  text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
  text = re.sub(r"`[^`\n]*`", "", text)
  return re.findall(r"!?\[[^\]]*\]\(([^)\s]+)\)", text)


def _anchors(text: str) -> set[str]:
  """The anchors GitHub gives a page's headings: lower case, punctuation but '-' and '_' dropped, spaces as '-',
  and '-1', '-2', ... after a repeated one."""
  anchors, seen = set(), {}
  for heading in re.findall(r"^#+ (.*)$", re.sub(r"^```.*?^```", "", text, flags=re.S | re.M), flags=re.M):
    slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
    anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
    seen[slug] = seen.get(slug, 0) + 1
  return anchors


@pytest.mark.fast
def test_every_relative_link_points_to_a_file_and_heading():
  broken = []
  for page in _pages():
    for target in _links(_read(page)):
      if re.match(r"^[a-z][a-z0-9+.-]*:", target):
        continue  # A URL.
      file, _, anchor = target.partition("#")
      path = os.path.normpath(os.path.join(REPO, os.path.dirname(page), file)) if file else os.path.join(REPO, page)
      if not os.path.exists(path):
        broken.append(f"{page}: {target} (no such file)")
      elif anchor and path.endswith(".md") and anchor not in _anchors(_read(os.path.relpath(path, REPO))):
        broken.append(f"{page}: {target} (no such heading)")
  assert not broken, "broken links: " + "; ".join(broken)


@pytest.mark.fast
def test_the_link_check_sees_links_and_headings():
  assert _links("[a](x.md) `[b](y.md)` ![c](z.png)\n```\n[d](w.md)\n```\n") == ["x.md", "z.png"]
  assert "docs/api.md" in _links(_read("README.md"))
  assert _anchors("# A `b`: c's d\n## sparse_targets.json\n## x\n## x\n") == {
      "a-b-cs-d", "sparse_targetsjson", "x", "x-1"}


@pytest.mark.fast
def test_readme_is_at_most_300_lines():
  lines = _read("README.md").count("\n")
  assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail into docs/."


@pytest.mark.fast
def test_the_readme_keeps_the_two_set_up_commands():
  readme = _read("README.md")
  assert "make demo   #" in readme and "make test   #" in readme
  makefile = _read("Makefile")
  assert re.search(r"^demo: .*\n\t\$\(VENV\)/bin/student-train demo$", makefile, flags=re.M)
  assert re.search(r"^test: .*\n\t\$\(VENV\)/bin/python -m pytest -q -n 2 --dist loadfile$", makefile, flags=re.M)


def _api_example() -> tuple[str, str]:
  """The Python block after the api-example marker of docs/api.md, and the text block after it (its output)."""
  page = _read("docs/api.md")
  assert "<!-- api-example" in page, "docs/api.md lost its api-example marker"
  after = page.split("<!-- api-example", 1)[1]
  code = re.search(r"^```python\n(.*?)^```", after, flags=re.S | re.M)
  output = re.search(r"^```text\n(.*?)^```", after[code.end():], flags=re.S | re.M)
  return code.group(1), output.group(1)


def test_the_api_example_prints_what_the_page_says(tmp_path, monkeypatch):
  code, expected = _api_example()
  monkeypatch.chdir(tmp_path)
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # The example's tempfile.mkdtemp() lands in tmp_path.
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    exec(compile(code, "docs/api.md", "exec"), {"__name__": "__api_example__"})  # pylint: disable=exec-used
  assert printed.getvalue() == expected


def _api_names() -> list[str]:
  """The dotted names (`teacher_cache.build_cache`, `shared.CacheSpec`) in the first column of docs/api.md's
  tables."""
  names = []
  for line in _read("docs/api.md").splitlines():
    if line.startswith("| `"):
      names += re.findall(r"`([a-z_]+(?:\.[A-Za-z_]\w*)+)", line.split("|")[1])
  return names


@pytest.mark.fast
@pytest.mark.parametrize("name", _api_names())
def test_every_name_the_api_page_lists_exists(name):
  module, attribute = name.rsplit(".", 1)
  assert hasattr(importlib.import_module(module), attribute), f"docs/api.md names {name}, which does not exist"
