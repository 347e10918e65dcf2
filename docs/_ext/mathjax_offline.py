"""MkDocs hook: serve MathJax from the built site, so that maths renders with no network.

MathJax 3 comes from the ``django-static-mathjax`` package (in the ``docs`` extra; despite
its name it has no dependency, it only ships MathJax's files). After every build
(``mkdocs build`` and each rebuild of ``mkdocs serve``) this hook copies the parts of its
``es5`` bundle that the TeX-to-SVG output needs into ``<site>/javascripts/mathjax/``: the
``tex-svg.js`` component (its glyphs are built in, so no font file is fetched), the TeX
extensions it may load on demand and the menu. ``mkdocs.yml`` loads
``javascripts/mathjax/tex-svg.js`` after the configuration in ``javascripts/mathjax.js``.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

from mkdocs.exceptions import PluginError

#: Paths inside MathJax's ``es5`` folder that the pages need.
PARTS = ("tex-svg.js", "input/tex/extensions", "ui", "a11y", "adaptors", "LICENSE")
TARGET = "javascripts/mathjax"


def mathjax_es5() -> Path:
    """The ``es5`` folder of the installed MathJax bundle."""
    spec = importlib.util.find_spec("mathjax")
    if spec is None or spec.origin is None:
        raise PluginError("MathJax is not installed: pip install 'sbnn_addons[docs]' "
                          "(the django-static-mathjax package ships MathJax's files)")
    es5 = Path(spec.origin).parent / "static" / "mathjax" / "es5"
    if not (es5 / PARTS[0]).is_file():
        raise PluginError(f"no MathJax es5 bundle at {es5}: reinstall django-static-mathjax")
    return es5


def on_post_build(config, **kwargs) -> None:
    es5 = mathjax_es5()
    dest = Path(config["site_dir"]) / TARGET
    for part in PARTS:
        src = es5 / part if part != "LICENSE" else es5.parent / "LICENSE"
        if src.is_dir():
            shutil.copytree(src, dest / part, dirs_exist_ok=True)
        elif src.is_file():
            (dest / part).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / part)
