"""The documentation is complete and self-contained.

- Every public name (the packages' `__all__`) has a docstring and an entry in
  docs/api.md (one `::: module.Name` line), and so does every public member
  the library defines on them: the API reference hides undocumented members.
- `mkdocs build --strict` succeeds (when the `docs` extra is installed).
- Nothing in the repository points outside it: the contract is
  docs/semantics.md.
"""

from __future__ import annotations

import importlib
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


_OUTSIDE = [
    (re.compile(r"shared/"), "the shared/ folder is not in the repository"),
    (re.compile(r"(?<!docs/)(?<!\]\()(?<!: )\bsemantics\.md"), "cite the contract as docs/semantics.md"),
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
