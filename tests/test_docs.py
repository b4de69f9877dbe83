"""The documentation cannot rot silently: README.md and docs/*.md are checked and their code runs.

Every shell and Python block (a fence tagged ``bash``, ``sh``, ``shell``, ``console``,
``python`` or ``py``, or not tagged at all) starts with a marker line: ``# docs-test: run`` or
``# docs-test: skip (<reason>)``; a block without one fails. The ``run`` blocks of each page
execute in page order, each in a fresh shell or interpreter, from a scratch directory of that
page holding ``examples/`` (a link to the repository's), against one live ``esmc serve --model
esmc-tiny`` on free ports. Nothing in a block is rewritten: a block finds the server through the
environment the docs name: ``ESMC_TARGET`` (gRPC ``host:port``, also the CLI's default),
``ESMC_HTTP_URL`` (the Forge-compatible HTTP front) and ``ESMC_METRICS_URL``.

Also checked: the README fits in 200 lines, its test command is the one CI runs, every relative
link and every repository path a page or a docstring cites exists, and the pages say nothing
about the machines or process of the project's development.
"""

from __future__ import annotations

import glob
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers.processes import ServeProcess, free_port

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CODE_LANGUAGES = {"", "bash", "sh", "shell", "console", "python", "py"}
MARKER = re.compile(r"^# docs-test: (run|skip \((?P<reason>[^)]+)\))\s*$")
FENCE = re.compile(r"^```([\w+-]*)\s*$")
BLOCK_TIMEOUT_S = 300


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    language: str
    code: str

    @property
    def name(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"

    @property
    def marker(self) -> re.Match | None:
        first = self.code.splitlines()[0] if self.code.strip() else ""
        return MARKER.match(first)

    @property
    def runs(self) -> bool:
        return self.marker is not None and self.marker.group(1) == "run"

    @property
    def python(self) -> bool:
        return self.language in ("python", "py")


def blocks_of(page: Path) -> list[Block]:
    """The fenced blocks of a page that hold shell or Python code."""
    blocks, lines = [], page.read_text().splitlines()
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i].strip()) if lines[i].lstrip().startswith("```") else None
        if opening is None:
            i += 1
            continue
        start, body = i, []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith("```"):
            body.append(lines[i])
            i += 1
        language = opening.group(1).lower()
        if language in CODE_LANGUAGES:
            blocks.append(Block(page, start + 1, language, "\n".join(body) + "\n"))
        i += 1
    return blocks


ALL_BLOCKS = [block for page in PAGES for block in blocks_of(page)]


def test_pages_have_code_blocks():
    assert (ROOT / "README.md").is_file() and len(PAGES) > 1
    assert sum(block.runs for block in ALL_BLOCKS) >= 10


@pytest.mark.parametrize("block", ALL_BLOCKS, ids=lambda b: b.name)
def test_block_has_a_marker(block):
    assert block.marker is not None, (
        f"{block.name}: the first line must be `# docs-test: run` or "
        f"`# docs-test: skip (<reason>)`, not {block.code.splitlines()[:1]}"
    )


# --- the run blocks against a live server ----------------------------------------------------


@pytest.fixture(scope="module")
def server():
    process = ServeProcess("esmc-tiny", ["--threads", "1"], ready_s=300)
    http_port = free_port()
    while http_port in (process.port, process.metrics_port):
        http_port = free_port()
    process.command += ["--http-port", str(http_port)]
    with process:
        yield process, http_port


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """One scratch directory per page (later blocks may read what earlier ones wrote)."""
    directories: dict[Path, Path] = {}

    def of(page: Path) -> Path:
        if page not in directories:
            directory = tmp_path_factory.mktemp(page.stem)
            (directory / "examples").symlink_to(ROOT / "examples")
            directories[page] = directory
        return directories[page]

    return of


def block_env(process: ServeProcess, http_port: int) -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)
    return {
        **os.environ,
        "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
        "ESMC_TARGET": process.target,
        "ESMC_HTTP_URL": f"http://127.0.0.1:{http_port}",
        "ESMC_METRICS_URL": f"http://127.0.0.1:{process.metrics_port}/metrics",
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
    }


@pytest.mark.e2e
@pytest.mark.parametrize("block", [b for b in ALL_BLOCKS if b.runs], ids=lambda b: b.name)
def test_run_block(block, server, scratch):
    process, http_port = server
    directory = scratch(block.page)
    script = directory / f"block_{block.line}.{'py' if block.python else 'sh'}"
    script.write_text(block.code)
    shell = ["bash", "-eo", "pipefail"]
    command = [sys.executable, str(script)] if block.python else [*shell, str(script)]
    result = subprocess.run(
        command, cwd=directory, env=block_env(process, http_port), capture_output=True,
        text=True, timeout=BLOCK_TIMEOUT_S,
    )
    assert result.returncode == 0, (
        f"{block.name} exited {result.returncode}\n--- code\n{block.code}\n--- stdout\n"
        f"{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-3000:]}"
    )


# --- what the pages say and cite ------------------------------------------------------------


def test_readme_fits_in_200_lines():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 200, len(lines)


def test_ci_runs_the_readme_test_command():
    commands = [
        line for block in blocks_of(ROOT / "README.md") for line in block.code.splitlines()
        if "python -m pytest" in line and not line.startswith("#")
    ]
    assert len(commands) == 1, commands
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert commands[0] in ci, f"{commands[0]!r} is not a line of .ci/run"


LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
CITED = re.compile(
    r"`((?:\.ci|benchmarks|client|deploy|docs|esmc|examples|protos|server|tests|tools)/[\w./*-]+)`"
)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_and_cited_files_exist(page):
    text = page.read_text()
    missing = []
    for target in LINK.findall(text):
        if "://" in target or target.startswith("mailto:"):
            continue
        if not (page.parent / target).exists():
            missing.append(target)
    for cited in CITED.findall(text):
        if not glob.glob(str(ROOT / cited.rstrip("/"))):
            missing.append(cited)
    assert not missing, f"{page.name} cites what does not exist: {missing}"


def test_code_cites_only_docs_that_exist():
    missing = []
    for path in [*ROOT.glob("*/**/*.py"), *ROOT.glob("*.toml")]:
        if ".venv" in path.parts or "shared" in path.parts:
            continue
        for cited in re.findall(r"\bdocs/[\w.-]+\.md\b", path.read_text(errors="replace")):
            if not (ROOT / cited).exists() and not (path.parent / cited).exists():
                missing.append(f"{path.relative_to(ROOT)}: {cited}")
    assert not missing, missing


NOT_ABOUT_THE_SOFTWARE = [
    re.compile(r"\bissue #?\d+", re.I),
    re.compile(r"\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*\d)[0-9a-f]{7,40}\b"),  # a commit hash
    re.compile(r"\bdevelopment (machine|VM)s?\b", re.I),
    re.compile(r"\b(these|this project's) machines\b", re.I),
    re.compile(r"\b(this|earlier|later) sessions?\b", re.I),
]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_pages_describe_the_software_only(page):
    found = [
        match.group(0)
        for pattern in NOT_ABOUT_THE_SOFTWARE
        for match in pattern.finditer(page.read_text())
    ]
    assert not found, f"{page.name}: {found}"
