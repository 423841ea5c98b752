"""The documentation site, in a real browser: headless Chromium from the system's packages.

The site is built (`mkdocs build --strict`) into a temporary folder and served
on 127.0.0.1; Chromium (driven by Selenium through /usr/bin/chromedriver)
then

- loads every page reachable from the home page, with no console error and
  no request to any other host (the site works offline: no fonts, scripts or
  styles from a CDN);
- follows every internal link: each target exists, and each `#anchor` names
  an element of its page;
- finds `merge_grad` with the site's own search box;
- sees code coloured (Pygments spans), the repository link absolute, and the
  contract's argument table whole (not clipped behind a scrollbar).

Skipped, with the reason, where Chromium, its driver, Selenium or the docs
extra is missing; `.ci/run` installs them (`apt-get install chromium
chromium-driver`; `pip install -e ".[docs]"`), so CI runs it.
"""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.xdist_group("site_browser"),  # one build and one browser under -n 2
    pytest.mark.skipif(
        not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
        reason="headless Chromium not installed (apt-get install -y chromium chromium-driver)",
    ),
]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The built site, served on 127.0.0.1; yields its base URL."""
    pytest.importorskip("mkdocs", reason="the docs extra is not installed")
    pytest.importorskip("material", reason="the docs extra is not installed")
    out = tmp_path_factory.mktemp("site")
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, NO_MKDOCS_2_WARNING="1"),
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=str(out))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", "--window-size=1280,900",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def _load(driver, url):
    driver.get(url)
    deadline = time.monotonic() + 30
    while driver.execute_script("return document.readyState") != "complete":
        assert time.monotonic() < deadline, f"{url} did not finish loading"
        time.sleep(0.05)


def _console_errors(driver):
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def _status(url):
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


def test_every_page_loads_cleanly_and_every_internal_link_resolves(site, browser):
    host = urllib.parse.urlsplit(site).netloc
    pages, queue, checked = {}, [site], {}
    fragments = []  # (page that links, target page, fragment)
    errors = []
    while queue:
        url = queue.pop(0)
        if url in pages:
            continue
        _load(browser, url)
        problems = _console_errors(browser)
        if problems:
            errors.append(f"{url}: console errors {problems}")
        foreign = browser.execute_script(
            "return performance.getEntriesByType('resource').map(e => e.name)"
            ".filter(n => !n.startsWith(location.origin) && !n.startsWith('data:'))"
        )
        if foreign:
            errors.append(f"{url}: requests to other hosts {foreign}")
        pages[url] = set(browser.execute_script(
            "return Array.from(document.querySelectorAll('[id]')).map(e => e.id)"
        ))
        hrefs = browser.execute_script(
            "return Array.from(document.querySelectorAll('a[href]')).map(a => a.href)"
        )
        for href in hrefs:
            parts = urllib.parse.urlsplit(href)
            if parts.scheme not in ("http", "https"):
                continue
            if parts.netloc != host:
                continue
            target = urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))
            if target not in checked:
                checked[target] = _status(target)
            if checked[target] != 200:
                errors.append(f"{url}: broken link {href} ({checked[target]})")
                continue
            if parts.fragment:
                fragments.append((url, target, urllib.parse.unquote(parts.fragment)))
            if (target.endswith("/") or target.endswith(".html")) and target not in pages:
                queue.append(target)
    for source, target, fragment in fragments:
        if fragment not in pages.get(target, set()):
            errors.append(f"{source}: link to {target}#{fragment}: no element with that id")
    assert not errors, "\n".join(errors)
    # Every page of the navigation was reached (the crawl is not trivially short).
    expected = ("installation/", "getting-started/", "guides/accumulation/", "semantics/",
                "builtin/", "migration/", "api/", "changelog/", "notebooks/01_keras_quickstart/")
    missing = [p for p in expected if site + p not in pages]
    assert not missing, f"pages not reached from the home page: {missing}"


def test_search_finds_merge_grad(site, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    _load(browser, site)
    browser.find_element(By.CSS_SELECTOR, "label.md-search__icon, .md-search__input").click()
    box = browser.find_element(By.CSS_SELECTOR, "input.md-search__input")
    box.send_keys("merge_grad")
    results = WebDriverWait(browser, 30).until(
        expected_conditions.presence_of_all_elements_located(
            (By.CSS_SELECTOR, ".md-search-result__item")
        )
    )
    assert results
    texts = " ".join(r.text for r in results)
    assert "merge_grad" in texts, texts[:500]
    assert not _console_errors(browser)


def test_code_is_coloured_and_repository_link_is_absolute(site, browser):
    _load(browser, site + "getting-started/")
    spans = browser.execute_script(
        "return document.querySelectorAll('.highlight pre code span[class]').length"
    )
    assert spans > 50, "code blocks are not highlighted"
    keyword_colour = browser.execute_script(
        "const k = document.querySelector('.highlight .kn, .highlight .k');"
        "return k && getComputedStyle(k).color"
    )
    text_colour = browser.execute_script(
        "return getComputedStyle(document.querySelector('.highlight pre code')).color"
    )
    assert keyword_colour and keyword_colour != text_colour
    repo = browser.execute_script(
        "const a = document.querySelector('a.md-source'); return a && a.getAttribute('href')"
    )
    assert repo and repo.startswith("https://"), repo


@pytest.mark.parametrize("width", [1280, 1024])
def test_contract_argument_table_is_not_clipped(site, browser, width):
    browser.set_window_size(width, 900)
    _load(browser, site + "semantics/")
    # A table, or a box around it, that scrolls or hides its overflow and whose
    # content is wider than itself shows part of the table behind a scrollbar.
    clipped = browser.execute_script(
        "const out = [];"
        "for (const t of document.querySelectorAll('.md-typeset table')) {"
        "  if (t.getBoundingClientRect().right > window.innerWidth) out.push('off-screen');"
        "  for (let e = t; e && !e.classList.contains('md-content'); e = e.parentElement) {"
        "    const overflow = getComputedStyle(e).overflowX;"
        "    if (overflow !== 'visible' && e.scrollWidth > e.clientWidth + 1) {"
        "      out.push(t.querySelector('th, td').textContent + ': ' + e.tagName"
        "               + ' ' + e.scrollWidth + ' > ' + e.clientWidth); break; }"
        "  }"
        "}"
        "return out;"
    )
    assert not clipped, f"tables wider than the page: {clipped}"
    headers = browser.execute_script(
        "return Array.from(document.querySelectorAll('.md-typeset table th'))"
        ".map(th => th.textContent.trim())"
    )
    assert "argument" in headers and "meaning" in headers
