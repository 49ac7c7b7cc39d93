"""A Sphinx extension for the book's build: each script tag once per page.

sphinx-thebe registers its configuration script in every read of the sources, and a
Jupyter Book build reads them twice, so each page declared ``const THEBE_JS_URL``
twice: a JavaScript error on every page (found by ``make check-site``). Listed in
``_config.yml`` under ``sphinx.extra_extensions``.
"""

from __future__ import annotations


def unique_scripts(app, pagename, templatename, context, doctree) -> None:
    scripts = context.get("script_files")
    if not scripts:
        return
    seen, kept = set(), []
    for js in scripts:
        attrs = getattr(js, "attributes", {}) or {}
        # A body-only script has filename None or "" depending on who added it.
        name = getattr(js, "filename", str(js)) or ""
        key = (name, tuple(sorted((k, str(v)) for k, v in attrs.items())))
        if key not in seen:
            seen.add(key)
            kept.append(js)
    scripts[:] = kept  # in place: handlers after this one add to the same list


def setup(app):
    # Early: html-page-context stops at the first handler that returns a template.
    app.connect("html-page-context", unique_scripts, priority=100)
    return {"parallel_read_safe": True, "parallel_write_safe": True}

