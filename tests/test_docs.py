"""The documentation is complete and self-contained.

- Every public name (the packages' `__all__`) has a docstring and an entry in
  docs/api.md (one `::: module.Name` line), and so does every public member
  the library defines on them: the API reference hides undocumented members.
- `mkdocs build --strict` succeeds (when the `docs` extra is installed), with
  every page in the navigation, a repository link that is not `href="None"`,
  and nothing fetched from a CDN (tests/test_site_browser.py loads it in a
  browser).
- Nothing in the repository points outside it: the contract is
  docs/semantics.md.
- Packaging: `py.typed` ships; the long description (README.md) has absolute
  links on a package index and renders there; the project's address is
  written in one place (setup.cfg's `url`).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("keras_accum", "keras_accum.keras", "keras_accum.torch")


def _public_objects():
    """(dotted name, object) for every name in the packages' `__all__`."""
    out = []
    for package in PACKAGES:
        module = importlib.import_module(package)
        for name in module.__all__:
            if name.startswith("__"):  # __version__
                continue
            out.append((f"{package}.{name}", getattr(module, name)))
    return out


def _api_entries():
    with open(os.path.join(ROOT, "docs", "api.md"), encoding="utf-8") as f:
        paths = re.findall(r"^:::\s*([\w.]+)\s*$", f.read(), flags=re.M)
    objects = []
    for path in paths:
        module_name, _, attr = path.rpartition(".")
        objects.append(getattr(importlib.import_module(module_name), attr))
    return paths, objects


@pytest.mark.parametrize("name, obj", _public_objects(), ids=lambda v: v if isinstance(v, str) else "")
def test_public_name_documented_and_in_api_reference(name, obj):
    assert inspect.getdoc(obj), f"{name} has no docstring"
    _, documented = _api_entries()
    assert any(obj is o for o in documented), (
        f"{name} is public but missing from docs/api.md: add the line `::: {name}`"
    )


def _own_public_members(cls):
    for attr, member in vars(cls).items():
        if attr.startswith("_"):
            continue
        if isinstance(member, property) or inspect.isfunction(member) or isinstance(
            member, (classmethod, staticmethod)
        ):
            yield attr


@pytest.mark.parametrize(
    "name, obj", [(n, o) for n, o in _public_objects() if inspect.isclass(o)], ids=lambda v: v if isinstance(v, str) else ""
)
def test_public_members_documented(name, obj):
    # inspect.getdoc falls back to the base class's docstring (an override of
    # `get_config` or `state_dict` is documented by its framework).
    missing = [a for a in _own_public_members(obj) if not inspect.getdoc(getattr(obj, a))]
    assert not missing, f"{name}: public members without a docstring: {missing}"


def test_api_reference_entries_resolve():
    paths, objects = _api_entries()
    assert paths, "docs/api.md has no `:::` entries"
    public = [o for _, o in _public_objects()]
    stray = [p for p, o in zip(paths, objects) if not any(o is q for q in public)]
    assert not stray, f"docs/api.md documents names that are not public: {stray}"


def test_mkdocs_build_strict(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert os.path.exists(tmp_path / "api" / "index.html")
    pages = []
    for dirpath, _, filenames in os.walk(tmp_path):
        pages += [os.path.join(dirpath, f) for f in filenames if f.endswith(".html")]
    for page in pages:
        with open(page, encoding="utf-8") as f:
            html = f.read()
        assert 'href="None"' not in html, page
        # A link between pages stays on the site; docs/_hooks.py sends only
        # links to files outside docs/ to the repository, and they exist.
        for target in re.findall(r'href="https?://[^"]*/blob/main/([^"#]+)', html):
            assert not target.startswith("docs/"), (page, target)
            assert os.path.exists(os.path.join(ROOT, target)), (page, target)
        assert "fonts.googleapis" not in html and "fonts.gstatic" not in html, page
    # The notebooks are pages with their plots; the changelog is CHANGELOG.md.
    with open(tmp_path / "notebooks" / "01_keras_quickstart" / "index.html", encoding="utf-8") as f:
        assert "data:image/png;base64" in f.read()
    with open(tmp_path / "changelog" / "index.html", encoding="utf-8") as f:
        assert "Keep a Changelog" in f.read()
    with open(tmp_path / "api" / "index.html", encoding="utf-8") as f:
        api = f.read()
    # Members of private mixins are documented on the public class; private
    # bases are not listed.
    for member in ("from_keras_optimizer", "minimize", "compute_gradients", "aggregate_gradients"):
        assert f'id="keras_accum.AccumOptimizer.{member}"' in api, member
    assert not re.search(r"Bases:[^<]*<code>[^<]*<span[^>]*>_", api)


def _nav_pages(nav):
    for item in nav:
        if isinstance(item, str):
            yield item
        elif isinstance(item, dict):
            for value in item.values():
                yield from _nav_pages([value] if isinstance(value, str) else value)


def test_every_documentation_page_is_in_the_navigation():
    yaml = pytest.importorskip("yaml")
    with open(os.path.join(ROOT, "mkdocs.yml"), encoding="utf-8") as f:
        config = yaml.safe_load(f)
    nav = set(_nav_pages(config["nav"]))
    docs = os.path.join(ROOT, "docs")
    pages = set()
    for dirpath, dirnames, filenames in os.walk(docs, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith((".", "_"))]
        for f in filenames:
            if f.endswith((".md", ".ipynb")):
                pages.add(os.path.relpath(os.path.join(dirpath, f), docs).replace(os.sep, "/"))
    assert pages - nav == set(), f"pages missing from mkdocs.yml's nav: {sorted(pages - nav)}"
    assert nav - pages == set(), f"nav entries without a page: {sorted(nav - pages)}"


# ------------------------------------------------------------------ packaging
def _setup_module():
    spec = importlib.util.spec_from_file_location("keras_accum_setup", os.path.join(ROOT, "setup.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # not __main__: defines the helpers, runs no setup()
    return module


def test_long_description_has_absolute_links_and_renders():
    setup = _setup_module()
    url = setup._url()
    text = setup._long_description(url)
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    assert targets
    relative = [t for t in targets if not re.match(r"^(https?://|mailto:|#)", t)]
    assert not relative, f"relative links break on a package index: {relative}"
    assert f"]({url}/blob/main/docs/semantics.md)" in text
    renderer = pytest.importorskip("readme_renderer.markdown")
    html = renderer.render(text)
    assert html and "<table>" in html and "keras_accum" in html
    assert set(setup.project_urls(url)) == {"Documentation", "Source", "Changelog", "Issues"}


def test_py_typed_ships_with_the_package():
    import configparser

    assert os.path.exists(os.path.join(ROOT, "keras_accum", "py.typed"))
    config = configparser.ConfigParser()
    config.read(os.path.join(ROOT, "setup.cfg"), encoding="utf-8")
    assert "py.typed" in config["options.package_data"]["keras_accum"]


def test_project_address_is_written_in_one_place():
    """setup.cfg's `url`; setup.py (project URLs, long description) and the
    site (docs/_hooks.py) read it from there."""
    setup = _setup_module()
    address = setup._url().split("://", 1)[1]
    holders = []
    for path in _repository_text_files():
        with open(path, encoding="utf-8", errors="replace") as f:
            if address in f.read():
                holders.append(os.path.relpath(path, ROOT))
    assert holders == ["setup.cfg"], holders


_OUTSIDE = [
    (re.compile(r"shared/"), "the shared/ folder is not in the repository"),
    (re.compile(r"(?<!docs/)(?<!\]\()(?<!\.\./)(?<!: )\bsemantics\.md"), "cite the contract as docs/semantics.md"),
    (re.compile(r"\btraps\.md"), "traps.md is not in the repository"),
    (re.compile(r"lead's decisions", re.I), "users cannot see the lead's decisions"),
    (re.compile(r"style habit", re.I), "the house style guide is not in the repository"),
    (re.compile(r"\bissues? #?\d+", re.I), "users cannot see our issue numbers"),
]


def _repository_text_files():
    skip_dirs = {".git", ".venv", "site", "build", "dist", "__pycache__", ".pytest_cache"}
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if d not in skip_dirs and not d.endswith(".egg-info")]
        for f in filenames:
            if f.endswith((".py", ".md", ".cfg", ".toml", ".yml", ".ipynb")) or f == "run":
                yield os.path.join(dirpath, f)


def test_nothing_points_outside_the_repository():
    this = os.path.abspath(__file__)
    found = []
    for path in _repository_text_files():
        if path == this:
            continue
        with open(path, encoding="utf-8", errors="replace") as f:
            for n, line in enumerate(f, start=1):
                for pattern, why in _OUTSIDE:
                    if pattern.search(line):
                        found.append(f"{os.path.relpath(path, ROOT)}:{n}: {why}: {line.strip()}")
    assert not found, "\n".join(found)
