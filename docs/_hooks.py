"""mkdocs hooks: the repository's address, from setup.cfg (the one place it is written).

`repo_url` (the header's repository link, never `href="None"`) and `edit_uri`
come from `[metadata] url` in setup.cfg; setup.py builds the package's
project URLs and its long description's absolute links from the same value.
A relative link from a page to a file of the repository outside docs/ (such
as `../benchmarks/README.md`) becomes a link to that file at `url`.
"""

from __future__ import annotations

import configparser
import os
import posixpath
import re

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_RELATIVE = re.compile(r"\]\((?P<path>\.\./[^)#\s]*)(?P<anchor>#[^)]*)?\)")


def repository_url() -> str:
    parser = configparser.ConfigParser()
    parser.read(os.path.join(_ROOT, "setup.cfg"), encoding="utf-8")
    return parser["metadata"]["url"].rstrip("/")


def on_config(config):
    url = repository_url()
    config.repo_url = url
    config.repo_name = url.rstrip("/").rsplit("/", 1)[-1]
    config.edit_uri = "edit/main/docs/"
    return config


def on_page_markdown(markdown, page, config, files):
    url = repository_url()
    here = posixpath.dirname(page.file.src_uri)

    def fix(m):
        target = posixpath.normpath(posixpath.join("docs", here, m["path"]))
        if target.startswith("docs/"):
            return m.group(0)  # a page of the site: mkdocs resolves it
        return f"]({url}/blob/main/{target}{m['anchor'] or ''})"

    return _RELATIVE.sub(fix, markdown)
