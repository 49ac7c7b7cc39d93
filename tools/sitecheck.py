"""``make check-site``: every page of the built book, opened in headless Chromium.

A page fails on a JavaScript error (or a failed or network request: the book must
read offline, so nothing may load from outside the site), unrendered math (raw ``$$``
or ``\\(`` in the prose, code and outputs aside, or a math element without MathJax
output), a diagram that mermaid did not turn into an SVG (or turned into its error
picture), an image that did not load, or an internal link to a missing page or
anchor.

The site is served from a local HTTP server, as a reader serves a downloaded copy
(``python -m http.server -d _build/html``): browsers refuse ES modules, which mermaid
is, from ``file://`` pages. Run ``python -m tools.sitecheck [_build/html]``.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import re
import shutil
import sys
import threading
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit

CHROMIUM = ("chromium", "chromium-browser", "google-chrome")
RAW_MATH = re.compile(r"\$\$|\\\(|\\\[|\\begin\{")
# Console messages of the theme itself that are not errors of the page: the
# pydata theme logs this when no light/dark choice is stored yet.
BENIGN_CONSOLE = ("Got invalid theme mode",)
TIMEOUT_MS = 30_000

# Run in the page after it loaded: what the reader would see.
INSPECT = """async () => {
  if (window.MathJax && MathJax.startup && MathJax.startup.promise)
    await MathJax.startup.promise;
  const deadline = Date.now() + 15000;
  const pending = () => [...document.querySelectorAll('.mermaid')]
      .filter(e => !e.querySelector('svg') || !e.dataset.processed);
  while (pending().length && Date.now() < deadline)
    await new Promise(r => setTimeout(r, 100));
  // mermaid may draw a diagram in steps: let it settle before judging it.
  await new Promise(r => setTimeout(r, 500));
  // The prose as a reader sees it: code, outputs and typeset math left out.
  const prose = (document.querySelector('main') || document.body).cloneNode(true);
  prose.querySelectorAll('pre, code, .highlight, .output, .cell_output, script, ' +
                         'style, mjx-container').forEach(e => e.remove());
  return {
    text: prose.textContent,
    math: document.querySelectorAll('.math').length,
    unrendered: [...document.querySelectorAll('.math')]
        .filter(e => !e.querySelector('mjx-container') &&
                     !(e.tagName.startsWith('MJX'))).length,
    mathjax: document.querySelectorAll('mjx-container').length,
    diagrams: document.querySelectorAll('.mermaid').length,
    undrawn: pending().length,
    diagram_errors: [...document.querySelectorAll('.mermaid')].filter(e =>
        e.querySelector('svg[aria-roledescription="error"]') ||
        e.textContent.includes('Syntax error in text')).length,
    broken_images: [...document.images]
        .filter(i => !i.complete || i.naturalWidth === 0).map(i => i.src),
    links: [...document.querySelectorAll('a[href]')].map(a => a.getAttribute('href')),
  };
}"""


def find_chromium() -> str:
    for name in CHROMIUM:
        if path := shutil.which(name):
            return path
    raise FileNotFoundError("no Chromium found (tried: " + ", ".join(CHROMIUM) +
                            "); install Debian's: apt-get install chromium")


class Server(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        pass  # the browser closed a connection early (a page left mid-load)


def serve(root: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    handler = functools.partial(Quiet, directory=str(root))
    server = Server(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/"


class Quiet(http.server.SimpleHTTPRequestHandler):
    extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map,
                      ".mjs": "text/javascript", ".js": "text/javascript"}

    def log_message(self, *args):
        pass


def link_problem(root: Path, page: Path, href: str, ids: dict) -> str | None:
    """Why an internal link is broken, or None (external links are not followed)."""
    parts = urlsplit(href)
    if parts.scheme or parts.netloc or href.startswith(("mailto:", "javascript:")):
        return None
    target = page if not parts.path else (page.parent / unquote(parts.path))
    target = target.resolve()
    if target.is_dir():
        target = target / "index.html"
    if not target.is_file():
        return f"link to a missing file: {href}"
    if parts.fragment and target.suffix == ".html":
        if target not in ids:
            text = target.read_text(encoding="utf-8", errors="replace")
            ids[target] = set(re.findall(r'\bid="([^"]+)"', text))
        if unquote(parts.fragment) not in ids[target]:
            return f"link to a missing anchor: {href}"
    return None


REDIRECT = re.compile(r'<meta http-equiv="refresh" content="\d+;\s*url=([^"]+)"', re.I)


def check_page(page, url: str, path: Path, root: Path, ids: dict) -> list[str]:
    redirect = REDIRECT.search(path.read_text(encoding="utf-8", errors="replace"))
    if redirect:  # a redirect page (the root index.html): its target must exist
        problem = link_problem(root, path, redirect.group(1), ids)
        return [problem] if problem else []
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(f"JavaScript error: {exc}"))
    page.on("console", lambda msg: msg.type == "error" and not msg.text.startswith(
        BENIGN_CONSOLE) and errors.append(f"console error: {msg.text}"))
    page.on("requestfailed", lambda req: errors.append(
        f"request failed: {req.url} ({req.failure})"))
    page.on("response", lambda res: res.status >= 400 and errors.append(
        f"HTTP {res.status}: {res.url}"))
    page.goto(url, wait_until="load")
    seen = page.evaluate(INSPECT)
    if RAW_MATH.search(seen["text"]):
        snippet = RAW_MATH.search(seen["text"])
        start = max(0, snippet.start() - 30)
        errors.append("raw math in the text: ..." + seen["text"][start:start + 70]
                      .replace("\n", " "))
    if seen["unrendered"] or (seen["math"] and not seen["mathjax"]):
        errors.append(f"{seen['unrendered']} of {seen['math']} math elements not "
                      "rendered by MathJax")
    if seen["undrawn"] or seen["diagram_errors"]:
        errors.append(f"{seen['undrawn']} diagrams not drawn, "
                      f"{seen['diagram_errors']} drawn as mermaid errors")
    errors += [f"image not loaded: {src}" for src in seen["broken_images"]]
    errors += [p for href in seen["links"]
               if (p := link_problem(root, path, href, ids))]
    return errors


def check_site(root: Path) -> dict[str, list[str]]:
    """Problems per page (relative path -> messages) for the site in ``root``."""
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import sync_playwright

    pages = sorted(p for p in root.rglob("*.html")
                   if not any(part.startswith(("_", ".")) for part in
                              p.relative_to(root).parts[:-1]))
    if not pages:
        raise FileNotFoundError(f"no HTML pages in {root}; build the book first "
                                "(make book)")
    server, base = serve(root)
    problems: dict[str, list[str]] = {}
    ids: dict = {}
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=find_chromium(),
                                         args=["--no-sandbox"])
            context = browser.new_context()
            context.set_default_timeout(TIMEOUT_MS)
            # Offline: anything not from the site itself is refused and reported.
            context.route(re.compile(r"^(?!" + re.escape(base) + ").*"),
                          lambda route: route.abort("blockedbyclient"))
            for path in pages:
                rel = str(path.relative_to(root))
                page = context.new_page()
                try:
                    found = check_page(page, urljoin(base, rel), path, root, ids)
                except PlaywrightError as exc:  # a page that never finished loading
                    found = [f"{type(exc).__name__}: {str(exc).splitlines()[0]}"]
                finally:
                    page.close()
                print(f"{'FAIL' if found else 'ok  '} {rel}", flush=True)
                if found:
                    problems[rel] = found
            browser.close()
    finally:
        server.shutdown()
    return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.sitecheck",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("site", nargs="?", default="_build/html")
    args = p.parse_args(argv)
    problems = check_site(Path(args.site).resolve())
    for rel, found in problems.items():
        print(f"\n{rel}:")
        for line in dict.fromkeys(found):
            print("   ", line)
    print(f"\ncheck-site: {len(problems)} page(s) with problems" if problems else
          "\ncheck-site: every page rendered cleanly")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
