"""The built website in a real browser (Debian's chromium driven by playwright, served on 127.0.0.1).

Every page in the table of contents loads with no console errors, typesets its math, loads every image, has no
broken internal link, and each chapter's Colab button points at its notebook. Screenshots of the landing page and
of chapter 1 are written to ``_build/test-artifacts/``.
"""
import functools
import http.server
import threading
from pathlib import Path
from urllib.parse import unquote, urldefrag, urlparse

import pytest
import yaml

from .conftest import ARTIFACTS, ROOT, in_ci

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def toc_pages() -> list[str]:
    """Site paths (``chapters/01_attention_cost.html``) of every page the table of contents lists."""
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    entries = [toc["root"]]
    for part in toc.get("parts", []):
        for chapter in part["chapters"]:
            if "file" in chapter:
                entries.append(chapter["file"])
            else:
                entries.extend(str(p.relative_to(ROOT).with_suffix("")) for p in sorted(ROOT.glob(chapter["glob"] + ".ipynb")))
    return [e + ".html" for e in entries]


@pytest.fixture(scope="module")
def server(built_site):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(built_site))
    handler.log_message = lambda *args: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        if in_ci():
            pytest.fail("CI must install Debian's chromium (.ci/run does apt-get install chromium)")
        pytest.skip("/usr/bin/chromium is not installed (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


@pytest.mark.parametrize("path", toc_pages())
def test_page(browser, server, built_site, path):
    page = browser.new_page()
    errors = []
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    failed = []
    page.on("requestfailed", lambda req: failed.append(req.url))
    page.on("response", lambda resp: failed.append(f"{resp.url} (HTTP {resp.status})") if resp.status >= 400 else None)
    response = page.goto(f"{server}/{path}", wait_until="load")
    assert response is not None and response.ok, f"{path}: HTTP {response and response.status}"

    if page.locator(".math").count():
        page.wait_for_function("window.MathJax && window.MathJax.startup && window.MathJax.startup.promise", timeout=20000)
        page.evaluate("window.MathJax.startup.promise")
        assert page.locator("mjx-container").count() > 0, f"{path}: math is not typeset"

    broken_images = page.evaluate(
        "Array.from(document.images).filter(img => !(img.complete && img.naturalWidth > 0)).map(img => img.src)")
    assert not broken_images, f"{path}: images that did not load: {broken_images}"

    page_file = (built_site / path).resolve()
    for href in page.eval_on_selector_all("a[href]", "els => els.map(e => e.getAttribute('href'))"):
        parsed = urlparse(href)
        if parsed.scheme or href.startswith(("#", "mailto:")):
            continue
        target = (page_file.parent / unquote(urldefrag(parsed.path).url)).resolve()
        assert target.exists(), f"{path}: broken internal link {href}"

    if path.startswith("chapters/"):
        colab = page.eval_on_selector_all("a[href*='colab.research.google.com']", "els => els.map(e => e.href)")
        notebook = path.replace(".html", ".ipynb")
        assert colab and all(link.endswith("/" + notebook) for link in colab), f"{path}: Colab links {colab}"

    if path in ("book/intro.html", "chapters/01_attention_cost.html"):
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / (Path(path).stem + ".png")), full_page=False)

    page.close()
    assert not failed, f"{path}: requests that failed: {failed}"
    assert not errors, f"{path}: console errors: {errors}"
