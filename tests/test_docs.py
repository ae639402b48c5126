"""The documentation site: it builds in strict mode, its generated CLI page covers every command
and flag, every page is reachable, every hook has a section, and no relative link is dangling."""

from __future__ import annotations

import argparse
import html
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from explainkit import hookspecs
from explainkit.cli import build_parser
from tests.conftest import REPO

DOCS = REPO / "docs"
CONFIG = REPO / "mkdocs.yml"
# Pages deliberately kept out of the navigation (none today): path relative to docs/.
NOT_IN_NAV: set[str] = set()


def _load_hook():
    spec = importlib.util.spec_from_file_location("cli_reference", DOCS / "hooks" / "cli_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _commands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()):
    """Every (sub)command of ``parser``, nested ones included: ``(names, parser)``."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*prefix, name), sub
                yield from _commands(sub, (*prefix, name))


def _text(page: Path) -> str:
    return html.unescape(re.sub(r"<[^>]+>", "", page.read_text()))


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    for module in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed (the dev extra has the documentation tools)")
    out = tmp_path_factory.mktemp("site")
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        timeout=600,
    )
    assert done.returncode == 0, f"mkdocs build --strict failed:\n{done.stdout}\n{done.stderr}"
    return out


def test_site_builds_in_strict_mode(site):
    for page in ("index.html", "cli/index.html", "api/index.html", "plugins/index.html", "architecture/index.html"):
        assert (site / page).is_file(), page
    assert not (site / "hooks").exists(), "the build-time hooks were published as pages"


def test_cli_page_has_every_command_and_flag(site):
    text = _text(site / "cli" / "index.html")
    assert "<!-- cli-reference -->" not in (site / "cli" / "index.html").read_text(), "the hook did not run"
    commands = list(_commands(build_parser()))
    assert commands, "build_parser() has no subcommands"
    missing = []
    for names, parser in commands:
        if f"usage: explainkit {' '.join(names)}" not in text:
            missing.append(" ".join(names))
        missing += [
            f"{' '.join(names)} {flag}" for action in parser._actions for flag in action.option_strings if flag not in text
        ]
    assert not missing, f"missing from the generated CLI page: {missing}"


def test_cli_reference_walks_any_parser():
    """The hook lists what a parser has (nested commands, aliases once), not a fixed list."""
    parser = argparse.ArgumentParser(prog="tool")
    sub = parser.add_subparsers(dest="command")
    one = sub.add_parser("one", aliases=["uno"], help="the first, 100%% sure")
    one.add_argument("--alpha")
    group = sub.add_parser("group", help="a group")
    inner = group.add_subparsers(dest="inner")
    inner.add_parser("leaf", help="nested").add_argument("--beta")
    page = _load_hook().render(parser)
    assert "## `tool one` { #one }" in page and "`tool uno`" not in page
    assert "### `tool group leaf` { #group-leaf }" in page
    assert "--alpha" in page and "--beta" in page and "100% sure" in page


def _nav_pages(nav) -> list[str]:
    pages = []
    for item in nav:
        value = next(iter(item.values())) if isinstance(item, dict) else item
        if isinstance(value, list):
            pages += _nav_pages(value)
        elif not re.match(r"[a-z]+://", value):
            pages.append(value)
    return pages


def test_every_page_is_in_the_nav():
    yaml = pytest.importorskip("yaml", reason="PyYAML comes with mkdocs (the dev extra)")
    nav = _nav_pages(yaml.safe_load(CONFIG.read_text())["nav"])
    for page in nav:
        assert (DOCS / page).is_file(), f"mkdocs.yml's nav names {page}, which does not exist"
    pages = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md") if "hooks" not in p.relative_to(DOCS).parts}
    assert not pages - set(nav) - NOT_IN_NAV, f"pages in docs/ but not in the nav: {sorted(pages - set(nav) - NOT_IN_NAV)}"


def test_every_hook_has_a_section_on_the_plugins_page():
    page = (DOCS / "plugins.md").read_text()
    hooks = [name for name in dir(hookspecs) if hasattr(getattr(hookspecs, name), "explainkit_spec")]
    assert hooks
    for name in hooks:
        assert re.search(rf"^#+ .*\b{name}\(", page, re.M), f"hook {name} has no section (a heading) in docs/plugins.md"


def _links(markdown: str) -> list[str]:
    markdown = re.sub(r"^(```+|~~~+).*?^\1", "", markdown, flags=re.S | re.M)  # fenced code
    markdown = re.sub(r"`[^`\n]+`", "", markdown)  # inline code
    targets = re.findall(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", markdown)
    targets += re.findall(r"""<img[^>]+src=["']([^"']+)["']""", markdown)
    return [t for t in targets if not re.match(r"[a-z][a-z0-9+.-]*:|#", t)]


@pytest.mark.parametrize(
    "source",
    [REPO / "README.md", *sorted(p for p in DOCS.rglob("*.md") if "hooks" not in p.relative_to(DOCS).parts)],
    ids=lambda p: p.relative_to(REPO).as_posix(),
)
def test_relative_links_point_at_files_that_exist(source: Path):
    dangling = [t for t in _links(source.read_text()) if not (source.parent / t.split("#")[0]).exists()]
    assert not dangling, f"{source.relative_to(REPO)} links to missing files: {dangling}"


def test_the_site_loads_nothing_from_another_host(site):
    """It must work offline: no web fonts, scripts, styles or images from elsewhere (links are fine)."""
    remote = re.compile(r"""<(?:script|link|img|iframe|source)\b[^>]*\b(?:src|href)=["'](?:https?:)?//""", re.I)
    pages = [p for p in site.rglob("*.html") if remote.search(p.read_text())]
    assert not pages, f"pages that load from another host: {[p.relative_to(site).as_posix() for p in pages]}"
    css = [p for p in site.rglob("*.css") if re.search(r"@import\s+url\([\"']?https?:", p.read_text())]
    assert not css, css
