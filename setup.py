"""Package build: the metadata is in setup.cfg; this file adds what needs code.

- The long description is README.md with its relative links (`docs/...`,
  `CHANGELOG.md`, `#anchors` stay) made absolute against `url` in setup.cfg,
  so that it renders with working links on a package index.
- The project URLs (Documentation, Source, Changelog, Issues) come from the
  same `url`: the project's host is written in one place.
"""

from __future__ import annotations

import configparser
import os
import re

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _url() -> str:
    parser = configparser.ConfigParser()
    parser.read(os.path.join(HERE, "setup.cfg"), encoding="utf-8")
    return parser["metadata"]["url"].rstrip("/")


def absolute_links(markdown: str, url: str) -> str:
    """`[text](docs/x.md)` -> `[text](URL/blob/main/docs/x.md)`; absolute links,
    `mailto:` and in-page `#anchors` are left alone."""

    def fix(match: re.Match) -> str:
        target = match.group(2)
        if re.match(r"^([a-z][a-z0-9+.-]*:|#|/)", target, flags=re.I):
            return match.group(0)
        kind = "tree" if target.endswith("/") else "blob"
        return f"{match.group(1)}({url}/{kind}/main/{target.lstrip('./')})"

    return re.sub(r"(\]|\]:\s?)\(([^)\s]+)\)", fix, markdown)


def _long_description(url: str) -> str:
    with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
        return absolute_links(f.read(), url)


def project_urls(url: str) -> dict:
    return {
        "Documentation": f"{url}/tree/main/docs",
        "Source": url,
        "Changelog": f"{url}/blob/main/CHANGELOG.md",
        "Issues": f"{url}/issues",
    }


if __name__ == "__main__":  # setuptools runs this file as __main__; tests import it
    URL = _url()
    setup(long_description=_long_description(URL), project_urls=project_urls(URL))
