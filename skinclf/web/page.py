"""The one page both browser front ends show: `skinclf serve`'s and the site `skinclf export
--format web` writes.

What they share lives once, in `skinclf/web/static/`: the markup (`page.html`, with `{{slots}}`),
the stylesheet (`page.css`) and the script (`page.js`: model panel, rows, top-k bars, melanoma
probability, sorting, the CSV and its formula-safe cells, choosing and dropping images). Each
page keeps only what differs, in a parts file (`static/serve-parts.html`: serve's, which uploads
to the API from `static/serve.js`; `site/parts.html`: the site's, which runs ONNX Runtime Web
from `site/app.js` with `site/style.css`). Serve answers the shared files at /static/; the
export copies them next to `index.html`.
"""

from __future__ import annotations

import re
from importlib import resources

SHARED_FILES = ("page.js", "page.css")  # in skinclf/web/static/, used by both pages as they are
_PART = re.compile(r"^<!-- part: (\w+) -->\n", re.MULTILINE)
_SLOT = re.compile(r"\{\{(\w+)\}\}")
_LINE_SLOT = re.compile(r"^([ \t]*)\{\{(\w+)\}\}\n", re.MULTILINE)  # alone on its line: indented as it, gone if empty


def shared_file(name: str) -> bytes:
    """One of `SHARED_FILES` (or serve's own script), as shipped in the package."""
    return resources.files("skinclf.web").joinpath("static", name).read_bytes()


def parts(text: str) -> dict[str, str]:
    """A parts file's slots: each `<!-- part: NAME -->` line starts one (what precedes the first is a comment)."""
    pieces = _PART.split(text)
    return {name: body.strip("\n") for name, body in zip(pieces[1::2], pieces[2::2])}


def render_page(parts_file: str, static: str) -> str:
    """The page for `parts_file` ("static/serve-parts.html" or "site/parts.html", under skinclf/web/),
    loading the shared files from `static` ("/static/" for serve, "" for the site)."""
    web = resources.files("skinclf.web")
    filled = {"static": static, **parts(web.joinpath(parts_file).read_text(encoding="utf-8"))}
    template = web.joinpath("static", "page.html").read_text(encoding="utf-8")
    missing = sorted(set(_SLOT.findall(template)) - set(filled))
    if missing:
        raise ValueError(f"{parts_file} lacks the part(s) {', '.join(missing)} that static/page.html needs")
    template = _LINE_SLOT.sub(lambda m: "".join(m.group(1) + line + "\n" if line else "\n"
                                                for line in filled[m.group(2)].split("\n")) if filled[m.group(2)] else "",
                              template)
    return _SLOT.sub(lambda m: filled[m.group(1)], template)
