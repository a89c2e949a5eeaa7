"""Write an HTML template for `dvc plots show --html-template` that carries Vega, Vega-Lite and Vega-Embed
inline, so that the plots page works offline (DVC's own page loads them from a CDN).

The scripts come from the npm registry, pinned by version and checked against their npm integrity digests;
the downloaded packages are kept next to the template and reused. Charts are drawn as SVG.

    python tools/offline_plots_page.py build/vega/dvc_plots.html
"""
from __future__ import annotations

import base64
import hashlib
import io
import os
import sys
import tarfile
import urllib.request
from pathlib import Path

PACKAGES = {   # name: (version, npm integrity of the package tarball)
    "vega": ("5.33.1", "sha512-1fArfVDUqVbb5z8n+/nVQb+VNBzx8svY6CrsyTK4Ujm4yrd9I1auoKxBAPXLCavY1LcrbHUskQbGUP8gXOzyQw=="),
    "vega-lite": ("5.23.0",
                  "sha512-l4J6+AWE3DIjvovEoHl2LdtCUkfm4zs8Xxx7INwZEAv+XVb6kR6vIN1gt3t2gN2gs/y4DYTs/RPoTeYAuEg6mA=="),
    "vega-embed": ("6.29.0",
                   "sha512-PmlshTLtLFLgWtF/b23T1OwX53AugJ9RZ3qPE2c01VFAbgt3/GSNI/etzA/GzdrkceXFma+FDHNXUppKuM0U6Q=="),
}
REGISTRY = os.environ.get("NPM_CONFIG_REGISTRY", "https://registry.npmjs.org").rstrip("/")

# DVC fills {refresh_tag} and {plot_divs}; without a {scripts} placeholder its CDN <script> tags are left out.
PAGE = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <meta charset="utf-8">
    <title>DVC Plot</title>
    <style>
        table {
            border-spacing: 15px;
        }
    </style>
%s
    <script>
        // SVG instead of canvas: sharp at any zoom, and the numbers in the charts are text.
        const embedCanvas = vegaEmbed;
        window.vegaEmbed = (el, spec, options) => embedCanvas(el, spec, Object.assign({renderer: "svg"}, options));
    </script>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def package(name: str, folder: Path) -> bytes:
    """The tarball of one pinned package: from `folder` if already there and intact, else downloaded."""
    version, integrity = PACKAGES[name]
    path = folder / f"{name}-{version}.tgz"
    if path.is_file() and matches(path.read_bytes(), integrity):
        return path.read_bytes()
    url = f"{REGISTRY}/{name}/-/{name}-{version}.tgz"
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            data = response.read()
    except OSError as exc:
        sys.exit(f"error: cannot download {url}: {exc}")
    if not matches(data, integrity):
        sys.exit(f"error: {url} does not match its pinned npm integrity digest")
    path.write_bytes(data)
    return data


def matches(data: bytes, integrity: str) -> bool:
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode() == integrity


def script(name: str, tarball: bytes) -> str:
    with tarfile.open(fileobj=io.BytesIO(tarball)) as tar:
        source = tar.extractfile(f"package/build/{name}.min.js").read().decode("utf-8")
    if "</script" in source.lower():
        sys.exit(f"error: {name}.min.js contains '</script' and cannot be inlined")
    return f"    <script>/* {name} {PACKAGES[name][0]}, from npm */\n{source}\n    </script>"


def main(out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    scripts = "\n".join(script(name, package(name, out.parent)) for name in PACKAGES)
    partial = out.with_name(out.name + ".tmp")
    partial.write_text(PAGE % scripts, encoding="utf-8")
    partial.replace(out)
    print(f"wrote {out}: dvc plots show --html-template {out}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tools/offline_plots_page.py OUT.html")
    main(Path(sys.argv[1]))
