"""The documentation: the site builds with no warning, and every code block runs.

Pages are README.md and docs/*.md. Every fenced block has a language:

* ``python``: run. A page's python blocks run in order, in one fresh process,
  in a temporary folder, as one script; a page with a block of IPython magics
  (a line starting with ``%``) runs its blocks as the cells of one IPython shell
  instead (a magic that prints an error, as ``%dragon`` does, fails too).
  ``print(...)  # text`` states the output: the test checks that the line
  prints ``text`` (whitespace runs count as one space; ``...`` matches anything).
* ``console``: ``$ command`` lines, each followed by lines it must print (in that
  order; other lines may come between); ``sh``/``bash``: a script. Both run
  with ``.venv/bin`` on ``PATH``, in a temporary folder.
* ``text``: not code (a diagram, a synopsis).

Also: the site (mkdocs.yml) builds with ``--strict`` and no warning, README.md's
links resolve, and ``make plot`` draws from the committed benchmark figures.

A block that cannot run here (it installs things, or loads the machine for
minutes) has ``<!-- norun: why -->`` on the line before it; those are listed by
``test_every_block_is_run_or_marked_norun`` and nothing else is skipped.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import subprocess
import sys
import textwrap
import tokenize

import pytest

from conftest import ROOT, describe, run_checked, short_dirs

PYTHON = sys.executable
DOCS = os.path.join(ROOT, "docs")
PAGES = ["README.md"] + sorted(f"docs/{name}" for name in os.listdir(DOCS)
                               if name.endswith(".md"))
PYTHON_LANGS = {"python", "py"}
SHELL_LANGS = {"console", "sh", "bash", "shell"}
TEXT_LANGS = {"text"}
PAGE_TIMEOUT = 100          # seconds for one page's python blocks
COMMAND_TIMEOUT = 45        # seconds for one shell block (or console command)

FENCE = re.compile(r"^(```+|~~~+)\s*([\w+-]*)")
NORUN = re.compile(r"^<!--\s*norun:\s*(.*?)\s*-->\s*$")


@dataclasses.dataclass
class Block:
    page: str
    number: int             # 1-based, counting every fenced block of the page
    line: int               # of the opening fence, 1-based
    lang: str
    code: str
    norun: str | None       # the reason given in <!-- norun: ... -->, if any

    @property
    def where(self) -> str:
        return f"{self.page} block {self.number} (line {self.line}, {self.lang or 'no language'})"

    @property
    def magic(self) -> bool:
        return self.lang in PYTHON_LANGS and any(
            line.lstrip().startswith("%") for line in self.code.splitlines())


def blocks(page: str) -> list[Block]:
    """The fenced blocks of a page, in order."""
    with open(os.path.join(ROOT, page)) as f:
        lines = f.read().splitlines()
    out, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, lang, start = m.group(1), m.group(2).lower(), i
        prev = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        note = NORUN.match(prev.strip())
        i += 1
        body = []
        while i < len(lines) and not lines[i].startswith(fence):
            body.append(lines[i])
            i += 1
        assert i < len(lines), f"{page}: the block at line {start + 1} is never closed"
        i += 1
        out.append(Block(page, len(out) + 1, start + 1, lang, "\n".join(body) + "\n",
                         note.group(1) if note else None))
    return out


ALL = {page: blocks(page) for page in PAGES}


def runnable(kinds) -> list[Block]:
    return [b for page in PAGES for b in ALL[page] if b.lang in kinds and b.norun is None]


# -- stated output ------------------------------------------------------------------------
def matches(expected: str, got: str) -> bool:
    """``got`` is what ``expected`` states: runs of whitespace count as one space,
    ``...`` stands for anything."""
    norm = lambda s: " ".join(s.split())  # noqa: E731
    pattern = ".*".join(re.escape(part) for part in norm(expected).split("..."))
    return re.fullmatch(pattern, norm(got)) is not None


EXPECT_HELPER = textwrap.dedent('''\
    def _docs_expect(_expected, *args, **kwargs):
        """print(*args), and check it prints what the doc says it does."""
        import io as _io, re as _re, sys as _sys
        buf = _io.StringIO()
        print(*args, **dict(kwargs, file=buf))
        got = buf.getvalue()
        print(got, end="", file=kwargs.get("file") or _sys.stdout, flush=True)
        norm = lambda s: " ".join(s.split())
        pattern = ".*".join(_re.escape(p) for p in norm(_expected).split("..."))
        if _re.fullmatch(pattern, norm(got)) is None:
            raise AssertionError(f"the doc says this prints {_expected!r}; it printed {got!r}")
    ''')


def with_output_checks(code: str) -> str:
    """Each ``print(...)  # text`` line becomes ``_docs_expect("text", ...)``, which
    prints the same and checks it. Other lines are left as they are."""
    out = []
    for line in code.splitlines():
        code_part, comment = line, None
        if line.lstrip().startswith("print("):
            try:
                for tok in tokenize.generate_tokens(io.StringIO(line.strip() + "\n").readline):
                    if tok.type == tokenize.COMMENT:
                        indent = len(line) - len(line.lstrip())
                        code_part = line[:indent + tok.start[1]].rstrip()
                        comment = tok.string[1:].strip()
            except (tokenize.TokenError, SyntaxError):
                comment = None
        if comment and code_part.endswith(")"):
            indent = code_part[:len(code_part) - len(code_part.lstrip())]
            args = code_part.lstrip()[len("print("):-1]
            line = f"{indent}_docs_expect({comment!r}, {args})"
        out.append(line)
    return "\n".join(out) + "\n"


# -- running a page -----------------------------------------------------------------------
CELLS_DRIVER = textwrap.dedent('''\
    """Run a page's blocks as the cells of one IPython shell, as a notebook would."""
    import contextlib, io, json, re, sys
    from IPython.core.interactiveshell import InteractiveShell

    cells = json.load(open(sys.argv[1]))
    shell = InteractiveShell.instance()
    exec(cells["helper"], shell.user_ns)
    # %dragon prints "UsageError: ..." (and NameError, TypeError) instead of raising
    printed_error = re.compile(r"^(UsageError|[A-Z]\\w*Error): .*$", re.M)


    class Tee(io.TextIOBase):
        def __init__(self, out):
            self.out, self.seen = out, []

        def write(self, text):
            self.seen.append(text)
            return self.out.write(text)

        def flush(self):
            self.out.flush()


    for cell in cells["cells"]:
        print(f"--- {cell['where']}", flush=True)
        tee = Tee(sys.stdout)
        with contextlib.redirect_stdout(tee):
            result = shell.run_cell(cell["code"], store_history=True)
        text = "".join(tee.seen)
        if not result.success:
            print(f"DOCS-FAILED {cell['where']}: {result.error_before_exec or result.error_in_exec!r}",
                  file=sys.stderr, flush=True)
            sys.exit(1)
        if cell["magic"] and printed_error.search(text):
            print(f"DOCS-FAILED {cell['where']}: a magic printed an error: "
                  f"{printed_error.search(text).group(0)}", file=sys.stderr, flush=True)
            sys.exit(1)
    ''')


def page_script(runs: list[Block]) -> tuple[str, list]:
    """One script of the page's blocks, and (first line, block) for each."""
    parts, starts, line = [EXPECT_HELPER], [], EXPECT_HELPER.count("\n")
    for b in runs:
        code = f"# --- {b.where}\n" + with_output_checks(b.code)
        starts.append((line + 1, b))
        parts.append(code)
        line += code.count("\n")
    return "".join(parts), starts


def failing_block(stderr: str, script: str, starts: list) -> str:
    """Which block the script failed in: its top-level frame in the last traceback."""
    last = stderr.rsplit("Traceback (most recent call last):", 1)[-1]
    m = re.search(rf'File "{re.escape(script)}", line (\d+)', last)
    if not m:
        return "(block unknown)"
    n = int(m.group(1))
    first, block = [(f, b) for f, b in starts if f <= n][-1]
    return f"{block.where}: line {block.line + n - first} of the page"


PY_PAGES = [p for p in PAGES if any(b.lang in PYTHON_LANGS and b.norun is None
                                    for b in ALL[p])]


@pytest.mark.timeout(PAGE_TIMEOUT + 40)
@pytest.mark.parametrize("page", PY_PAGES)
def test_python_blocks_run(page, env_with_pkg):
    runs = [b for b in ALL[page] if b.lang in PYTHON_LANGS and b.norun is None]
    with short_dirs("dnbd-", "work") as (work, rtdir):
        if any(b.magic for b in runs):
            spec = os.path.join(work, "cells.json")
            with open(spec, "w") as f:
                json.dump({"helper": EXPECT_HELPER, "cells": [
                    {"where": b.where, "magic": b.magic,
                     "code": b.code if b.code.startswith("%%") else with_output_checks(b.code)}
                    for b in runs]}, f)
            driver = os.path.join(work, "run_cells.py")
            with open(driver, "w") as f:
                f.write(CELLS_DRIVER)
            # IPython's profile and history go to the temporary folder, not to ~/.ipython
            env = dict(env_with_pkg, IPYTHONDIR=os.path.join(work, ".ipython"))
            proc = run_checked([PYTHON, driver, spec], work, rtdir, env, timeout=PAGE_TIMEOUT)
            failed = re.findall(r"^DOCS-FAILED (.*)$", proc.stderr, re.M)
            assert proc.returncode == 0, \
                f"{failed[0] if failed else page}\n{describe(proc)}"
        else:
            text, starts = page_script(runs)
            script = os.path.join(work, os.path.basename(page).replace(".md", "_md.py"))
            with open(script, "w") as f:
                f.write(text)
            proc = run_checked([PYTHON, script], work, rtdir, env_with_pkg,
                               timeout=PAGE_TIMEOUT)
            assert proc.returncode == 0, \
                f"{failing_block(proc.stderr, script, starts)} failed\n{describe(proc)}"


def console_commands(code: str) -> list[tuple[str, list[str]]]:
    """[(command, the output lines stated after it)] of a console block."""
    out = []
    for line in code.splitlines():
        if line.startswith("$ "):
            out.append((line[2:], []))
        elif out:
            out[-1][1].append(line)
        elif line.strip():
            raise AssertionError(f"console block: output before any `$ ` command: {line!r}")
    return out


def check_console_output(where: str, cmd: str, stated: list[str], got: str) -> None:
    """Each non-blank line the doc states matches a line of the output, in order
    (other output lines may come between)."""
    lines = iter(re.split(r"[\r\n]+", got))
    for want in (w for w in stated if w.strip()):
        if not any(matches(want, line) for line in lines):
            raise AssertionError(f"{where}: `{cmd}` printed\n{got}\nwith no line like "
                                 f"{want!r} where the doc has it:\n" + "\n".join(stated))


@pytest.mark.timeout(2 * COMMAND_TIMEOUT + 30)
@pytest.mark.parametrize("block", runnable(SHELL_LANGS), ids=lambda b: f"{b.page}-{b.number}")
def test_shell_blocks_run(block, env_with_pkg):
    env = dict(env_with_pkg, PATH=os.pathsep.join([os.path.dirname(PYTHON),
                                                   env_with_pkg.get("PATH", "")]),
               VIRTUAL_ENV=os.path.dirname(os.path.dirname(PYTHON)))
    if block.lang == "console":
        runs = console_commands(block.code)
    else:
        runs = [(block.code, [])]
    assert runs, f"{block.where}: nothing to run"
    with short_dirs("dnbd-", "work") as (work, rtdir):
        for cmd, stated in runs:
            proc = run_checked(["bash", "-e", "-o", "pipefail", "-c", cmd], work, rtdir, env,
                               timeout=COMMAND_TIMEOUT)
            assert proc.returncode == 0, f"{block.where}: `{cmd}` failed\n{describe(proc)}"
            check_console_output(block.where, cmd, stated, proc.stdout)


def test_every_block_is_run_or_marked_norun():
    """No block goes unchecked without saying why: a language the test knows, and a
    reason for each norun block."""
    unknown, norun, counts = [], [], {}
    for page in PAGES:
        for b in ALL[page]:
            if b.lang not in PYTHON_LANGS | SHELL_LANGS | TEXT_LANGS:
                unknown.append(b.where)
            elif b.norun is not None:
                assert b.norun, f"{b.where}: <!-- norun: --> needs a reason"
                assert b.lang not in TEXT_LANGS, f"{b.where}: a text block never runs"
                norun.append(f"{b.where}: {b.norun}")
            kind = "text" if b.lang in TEXT_LANGS else "norun" if b.norun is not None \
                else "run"
            counts[kind] = counts.get(kind, 0) + 1
    assert not unknown, ("blocks with no language (or one the test does not know): give "
                         "each one python, console, sh or text:\n" + "\n".join(unknown))
    print(f"code blocks: {counts.get('run', 0)} run, {counts.get('norun', 0)} not run, "
          f"{counts.get('text', 0)} text")
    print("not run:\n" + "\n".join(norun))
    assert counts.get("run", 0) > counts.get("norun", 0)


def test_matches_and_output_checks():
    """The helpers the checks above rely on."""
    assert matches("[2, 3]", "[2, 3]\n") and matches("a   b", "a b")
    assert matches("2 node(s), ... core(s) in all", "2 node(s), 4 core(s) in all")
    assert not matches("[2, 3]", "[2, 4]")
    code = 'x = 1  # not checked\n    print(f(x), "#")   # 1 #\nprint(x)\n'
    assert with_output_checks(code) == \
        'x = 1  # not checked\n    _docs_expect(\'1 #\', f(x), "#")\nprint(x)\n'


# -- the site -----------------------------------------------------------------------------
@pytest.mark.timeout(90)
def test_site_builds_with_no_warning(tmp_path):
    proc = subprocess.run([PYTHON, "-m", "mkdocs", "build", "--strict", "--clean",
                           "--config-file", os.path.join(ROOT, "mkdocs.yml"),
                           "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, describe(proc)
    warnings = [line for line in (proc.stdout + proc.stderr).splitlines()
                if "WARNING" in line or "ERROR" in line]
    assert not warnings, "\n".join(warnings)
    for page in PAGES[1:]:
        name = os.path.basename(page)[:-3]
        built = tmp_path / "site" / ("index.html" if name == "index" else f"{name}/index.html")
        assert built.exists(), f"{page} is not in the site"


def test_readme_links_resolve():
    """README.md is not part of the site, so its relative links are checked here."""
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    missing = [link for link in links if "://" not in link
               and not os.path.exists(os.path.join(ROOT, link))]
    assert links and not missing, f"README.md links to missing files: {missing}"


# -- the benchmark chart ------------------------------------------------------------------
@pytest.mark.timeout(90)
def test_benchmark_chart_draws_from_the_committed_figures(tmp_path):
    """`make plot` works from the figures in benchmarks/results/, and the chart it
    draws is the one docs/benchmarks.md shows."""
    out = tmp_path / "chart.svg"
    proc = subprocess.run([PYTHON, os.path.join(ROOT, "benchmarks", "plot.py"),
                           "--out", str(out)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, describe(proc)
    assert out.read_text().lstrip().startswith("<?xml"), describe(proc)
    assert "from ddict, pipeline, pool results" in proc.stdout, \
        f"a file in benchmarks/results/ is missing\n{describe(proc)}"
    with open(os.path.join(DOCS, "benchmarks.md")) as f:
        assert "](img/benchmarks.svg)" in f.read()
    assert os.path.exists(os.path.join(DOCS, "img", "benchmarks.svg"))
