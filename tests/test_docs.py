"""Every ```python block of README.md and docs/**/*.md runs, exactly as printed.

One test per page (``test_page_runs[docs/training.md]``): the page's blocks run in the order
they appear, in one namespace, with the working directory set to a fresh temporary folder
(files a page writes, ``net.pt`` or a plot, land there). Blocks fenced as anything other
than ``python`` (``bash``, ``text``, ``pycon``...) are not run. Indented blocks (inside an
admonition or a content tab) run too, dedented. A traceback names the page and the line of
the Markdown file, because each block is compiled with the page's path as file name and
its own line offset.

Set-up convention (the only hidden code): a page that reads a real dataset may declare,
anywhere in the page, an HTML comment that Markdown does not render::

    <!-- docs-setup
    data_dir = DATA_ROOT / "dvs_gesture_32"
    -->

It runs before the page's first block, in the same namespace. ``DATA_ROOT`` is the
``shared/data`` folder beside the repository (``<repo>/../shared/data``). The set-up may only
assign names whose name ends in ``dir`` or ``path`` from path expressions (names, string
constants, ``/``): no other hidden code. A page whose data folder is missing is skipped, not
failed. Pages must stay fast (small sizes, few steps): the test warns above 60 s per page.
"""

from __future__ import annotations

import ast
import re
import textwrap
import time
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA_ROOT = ROOT.parent / "shared" / "data"
PAGE_SECONDS = 60.0

#: Pages being rewritten by other work in progress, with the reason (temporary).
XFAIL: dict[str, str] = {}

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^\s`]*)[^`]*$")
_SETUP = re.compile(r"<!--\s*docs-setup\s*\n(?P<code>.*?)-->", re.S)


def _pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def python_blocks(text: str) -> list[tuple[int, str]]:
    """``(first line number, dedented source)`` of every ```python block, in page order."""
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, info = m["indent"], m["fence"], m["info"].lower()
        body, j = [], i + 1
        while j < len(lines):
            close = lines[j].strip()
            if close.startswith(fence) and set(close) <= set(fence[0]):
                break
            body.append(lines[j][len(indent):] if lines[j].startswith(indent) else lines[j])
            j += 1
        if info in ("python", "py", "python3"):
            blocks.append((i + 2, textwrap.dedent("\n".join(body)) + "\n"))
        i = j + 1
    return blocks


def setup_code(text: str) -> str | None:
    """The page's hidden set-up (see the module docstring), checked to assign paths only."""
    found = _SETUP.findall(text)
    if not found:
        return None
    code = textwrap.dedent("\n".join(found))
    for node in ast.parse(code).body:
        ok = isinstance(node, ast.Assign) and all(
            isinstance(t, ast.Name) and t.id.lower().endswith(("dir", "path"))
            for t in node.targets)
        ok = ok and all(isinstance(n, (ast.Name, ast.Constant, ast.BinOp, ast.Div, ast.Load))
                        for n in ast.walk(node.value))
        if not ok:
            raise AssertionError(f"docs-setup may only assign data paths, got: {ast.unparse(node)}")
    return code


def _params():
    out = []
    for page in _pages():
        rel = page.relative_to(ROOT).as_posix()
        marks = [pytest.mark.xfail(reason=XFAIL[rel], strict=False)] if rel in XFAIL else []
        out.append(pytest.param(page, id=rel, marks=marks))
    return out


def test_extractor_finds_indented_and_ignores_other_languages():
    text = "```bash\nls\n```\n=== \"tab\"\n\n    ```python\n    x = 1\n    ```\n```py\ny = x\n```\n"
    assert python_blocks(text) == [(7, "x = 1\n"), (10, "y = x\n")]


def test_setup_rejects_code_that_is_not_a_path():
    with pytest.raises(AssertionError, match="data paths"):
        setup_code("<!-- docs-setup\nimport os\n-->")
    assert setup_code('<!-- docs-setup\ndata_dir = DATA_ROOT / "x"\n-->').strip() == (
        'data_dir = DATA_ROOT / "x"')


@pytest.mark.parametrize("page", _params())
def test_page_runs(page: Path, tmp_path, monkeypatch):
    text = page.read_text(encoding="utf-8")
    blocks = python_blocks(text)
    if not blocks:
        return
    rel = page.relative_to(ROOT).as_posix()
    pytest.importorskip("matplotlib").use("Agg")
    ns: dict = {"__name__": "__docs__", "DATA_ROOT": DATA_ROOT}
    setup = setup_code(text)
    if setup is not None:
        exec(compile(setup, f"{rel}:docs-setup", "exec"), ns)
        missing = [str(v) for k, v in ns.items()
                   if k.lower().endswith(("dir", "path")) and isinstance(v, Path)
                   and not v.exists()]
        if missing:
            pytest.skip(f"{rel} needs data that is not here: {', '.join(missing)}")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    start = time.perf_counter()
    import torch

    from sbnn_addons import moments

    torch.manual_seed(0)  # each page from the same random state, whatever ran before it
    threads = torch.get_num_threads()
    rules = dict(moments._RULES)  # a page may register a variance rule: keep it to the page
    try:
        for line, src in blocks:
            # leading newlines: tracebacks give the line number in the Markdown file
            exec(compile("\n" * (line - 1) + src, str(page), "exec"), ns)
    finally:
        torch.set_num_threads(threads)
        moments._RULES.clear()
        moments._RULES.update(rules)
        import matplotlib.pyplot as plt

        plt.close("all")
    took = time.perf_counter() - start
    if took > PAGE_SECONDS:
        warnings.warn(f"{rel}: its code blocks took {took:.0f} s (> {PAGE_SECONDS:.0f} s); "
                      "use smaller examples", stacklevel=1)
