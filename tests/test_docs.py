"""The code in the docs runs: every `python` block in README.md and docs/, every examples/*.py.

A fenced block runs only if its language is `python` (in any case); blocks fenced as
`pycon`, `text`, `bash` and so on are shown, not run. The blocks of one page run in order, each
as its own test, in one module namespace and one temporary working directory, so a page
can build an example up across blocks; a traceback points at the line in the markdown
file. Each file in examples/ runs as `__main__` in a fresh interpreter, in a temporary
working directory, and must exit 0.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import traceback
import types
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_TIMEOUT = 120
"""Seconds an example may take before it counts as failed."""

_FENCE = re.compile(r"(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>.*)")


@attrs.frozen
class Block:
    """A fenced code block: its language, the line of its opening fence, its code."""

    lang: str
    line: int
    code: str


def parse_blocks(text: str) -> list[Block]:
    """Return the fenced code blocks of a markdown text, in order.

    Follows CommonMark where it matters here: a fence is three or more backticks or
    tildes, closed by a fence of the same character at least as long; backtick fences
    carry no backtick in their info string; an unclosed fence runs to the end; HTML
    comments hide what they contain. Indented fences (in lists, admonitions) have their
    indentation removed from the code.
    """
    blocks = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.lstrip().startswith("<!--"):
            while "-->" not in lines[i] and i + 1 < len(lines):
                i += 1
            i += 1
            continue
        opening = _FENCE.fullmatch(line)
        if opening is None or (opening["fence"][0] == "`" and "`" in opening["info"]):
            i += 1
            continue
        indent, fence = len(opening["indent"]), opening["fence"]
        words = opening["info"].split()
        code = []
        i += 1
        while i < len(lines):
            closing = _FENCE.fullmatch(lines[i])
            if (
                closing is not None
                and closing["fence"][0] == fence[0]
                and len(closing["fence"]) >= len(fence)
                and not closing["info"].strip()
            ):
                break
            body = lines[i]
            stripped = len(body) - len(body.lstrip(" \t"))
            code.append(body[min(indent, stripped) :])
            i += 1
        start = i - len(code)  # 1-based line of the opening fence
        blocks.append(Block(words[0].lower() if words else "", start, "\n".join(code) + "\n"))
        i += 1
    return blocks


def markdown_pages() -> list[Path]:
    """README.md and every page under docs/, in a stable order."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    return [page for page in pages if page.is_file()]


def python_blocks(page: Path) -> list[Block]:
    """The blocks of `page` that are run."""
    blocks = parse_blocks(page.read_text(encoding="utf-8"))
    return [block for block in blocks if block.lang == "python"]


def _relative(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


class EarlierBlockFailedError(Exception):
    """A block cannot run because a block before it on the same page failed."""


@attrs.define(eq=False)
class PageRun:
    """The blocks of one page, run in order in one module, in one working directory.

    Running block `n` first runs the blocks before it that have not run yet, so a
    single block can be selected with `-k` and still see what the page defined before.
    """

    name: str
    filename: str
    blocks: list[Block]
    cwd: Path
    module: types.ModuleType = attrs.field(init=False)
    _done: int = attrs.field(default=0, init=False)
    _failed: int | None = attrs.field(default=None, init=False)

    def __attrs_post_init__(self) -> None:
        # A real module, so classes defined on the page have an importable __module__,
        # as sagaflow's serializer expects of message and state types.
        self.module = types.ModuleType(self.name)
        self.module.__file__ = self.filename
        sys.modules[self.name] = self.module

    def close(self) -> None:
        """Forget the page's module."""
        if sys.modules.get(self.name) is self.module:
            del sys.modules[self.name]

    def run(self, index: int) -> None:
        """Run block `index`, after any earlier blocks not run yet.

        Raises:
            EarlierBlockFailedError: An earlier block failed in its own test before.
        """
        __tracebackhide__ = True
        if self._failed is not None and self._failed < index:
            failed = self.blocks[self._failed]
            raise EarlierBlockFailedError(f"the block at line {failed.line} failed")
        old_cwd = Path.cwd()
        os.chdir(self.cwd)
        try:
            while self._done <= index:
                self._run_one(self._done)
        finally:
            os.chdir(old_cwd)

    def _run_one(self, index: int) -> None:
        __tracebackhide__ = True
        block = self.blocks[index]
        # Pad with newlines so that line numbers in tracebacks are the markdown file's.
        code = compile("\n" * block.line + block.code, self.filename, "exec")
        try:
            exec(code, self.module.__dict__)
        except BaseException:
            self._failed = index
            raise
        self._done = index + 1


_PAGES = {_relative(page): python_blocks(page) for page in markdown_pages()}
_DOC_CASES = [
    pytest.param(page, index, id=f"{page}:{block.line}")
    for page, blocks in _PAGES.items()
    for index, block in enumerate(blocks)
]
_EXAMPLES = sorted((ROOT / "examples").glob("*.py"))


@pytest.fixture(scope="module")
def page_runs() -> Iterator[dict[str, PageRun]]:
    """The `PageRun` of each page whose blocks have started running in this module."""
    runs: dict[str, PageRun] = {}
    yield runs
    for run in runs.values():
        run.close()


@pytest.mark.parametrize(("page", "index"), _DOC_CASES)
def test_doc_block_runs(
    page_runs: dict[str, PageRun],
    tmp_path_factory: pytest.TempPathFactory,
    page: str,
    index: int,
) -> None:
    """The block runs without raising, after the blocks before it on its page."""
    run = page_runs.get(page)
    if run is None:
        slug = re.sub(r"\W", "_", page.removeprefix("docs/").removesuffix(".md"))
        run = page_runs[page] = PageRun(
            name=f"docs_{slug}",
            filename=str(ROOT / page),
            blocks=_PAGES[page],
            cwd=tmp_path_factory.mktemp(slug),
        )
    try:
        run.run(index)
    except EarlierBlockFailedError as e:
        pytest.skip(f"not run: in {page}, {e}")


@pytest.mark.parametrize("example", _EXAMPLES, ids=_relative)
def test_example_runs(example: Path, tmp_path: Path) -> None:
    """The example runs as a script, with warnings as errors, and exits 0."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    try:
        result = subprocess.run(
            [sys.executable, "-W", "error", str(example)],
            cwd=tmp_path,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=EXAMPLE_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired as e:
        outcome = f"was still running after {e.timeout} s and was killed"
        stdout, stderr = _text(e.stdout), _text(e.stderr)
    else:
        outcome = f"exited {result.returncode}"
        stdout, stderr = result.stdout, result.stderr
    assert outcome == "exited 0", (
        f"{_relative(example)} {outcome}\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
    )


def _text(output: str | bytes | None) -> str:
    # TimeoutExpired carries bytes even when text=True was asked for.
    if isinstance(output, bytes):
        return output.decode(errors="replace")
    return output or ""


_FIXTURE = """\
# Title

```python
x = 1
```

```python``` is inline code at the start of a line, not a fence.

```pycon
>>> x
1
```

~~~python
y = x + 1
~~~

````markdown
```python
not_run = True
```
````

<!--
```python
hidden = True
```
-->

!!! note

    ```Python  title="indented"
    if x:
        z = 3
    ```

```
no language
```

```python
unclosed = True
"""


def test_parse_blocks_finds_every_fenced_block() -> None:
    """Fences of backticks and tildes, nested, indented, hidden and unclosed."""
    assert parse_blocks(_FIXTURE) == [
        Block("python", 3, "x = 1\n"),
        Block("pycon", 9, ">>> x\n1\n"),
        Block("python", 14, "y = x + 1\n"),
        Block("markdown", 18, "```python\nnot_run = True\n```\n"),
        Block("python", 32, "if x:\n    z = 3\n"),
        Block("", 37, "no language\n"),
        Block("python", 41, "unclosed = True\n"),
    ]


def test_page_blocks_share_one_namespace_and_stop_at_a_failure(tmp_path: Path) -> None:
    """Later blocks see earlier names, run in the page's directory, and a traceback
    points at the markdown line; after a failing block the rest are not run."""
    page = "```python\nn = 1\n```\n\n```python\nimport os\ncwd = os.getcwd()\nn += 1\n```\n"
    page += "\n```python\nraise ValueError(n)\n```\n\n```python\nn = 0\n```\n"
    run = PageRun(
        name="docs_test_fixture",
        filename="fixture.md",
        blocks=parse_blocks(page),
        cwd=tmp_path,
    )
    try:
        run.run(1)  # runs block 0 first
        assert (run.module.n, run.module.cwd) == (2, str(tmp_path))

        with pytest.raises(ValueError, match=r"^2$") as raised:
            run.run(2)
        last = traceback.extract_tb(raised.value.__traceback__)[-1]
        assert (last.filename, last.lineno) == ("fixture.md", 12)

        with pytest.raises(EarlierBlockFailedError, match=r"^the block at line 11 failed$"):
            run.run(3)
        assert run.module.n == 2
    finally:
        run.close()
    assert "docs_test_fixture" not in sys.modules


def test_docs_pages_are_collected() -> None:
    """The collector looks where the docs are, so it cannot pass by finding nothing."""
    assert {"README.md", "docs/index.md"} <= set(_PAGES)
