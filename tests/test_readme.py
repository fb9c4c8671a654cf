"""The README and the pages under docs/ hold: their examples run as written, and every
relative link (file or #anchor) resolves.

Runnable examples: the README's Quick start (its first python block) and every python
block of a docs/ page whose preceding paragraph says it "runs as written". Blocks without
that sentence are fragments (they use a `client` or `logits` from the text around them).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import start_server

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()
DOCS = ROOT / "docs"

# Every page of the user's guide; the README must link each one.
GUIDE_PAGES = ["install", "losses", "client", "analyses", "training", "plugins",
               "command-line", "monitoring", "security", "resilience", "limits", "deploy",
               "open-inference", "performance", "development", "architecture"]

# The Markdown files whose relative links are checked.
LINKED_FILES = ["README.md", "CHANGELOG.md", "bench/results/HISTORY.md",
                "examples/plugin/README.md"]

RUNS_AS_WRITTEN = "runs as written"

# (id, page, a string the block contains, a string its output contains): the runnable
# examples the docs must keep.
EXAMPLES = [
    ("quick-start", "README.md", "from lossd import LossClient", "512"),
    ("client", "docs/client.md", "from lossd import InvalidArgument, LossClient",
     "INVALID_ARGUMENT: targets: class index"),
    ("remote-autograd", "docs/client.md", "RemoteLoss(client", " True"),
    ("asyncio", "docs/client.md", "async with AsyncLossClient", ""),
    ("shared-memory", "docs/client.md", "client.shared_memory(", "True"),
    ("analyses", "docs/analyses.md", "per_class=True, top_k=(1, 5), diagnostics=True", ""),
    ("tritonclient", "docs/open-inference.md", "import tritonclient", ""),
]


def blocks(text: str, lang: str) -> list[str]:
    """The fenced blocks of one language, in order."""
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def page(path: str) -> str:
    return (ROOT / path).read_text()


def marked_blocks(text: str) -> list[str]:
    """Python blocks whose preceding paragraph says the block runs as written."""
    found = []
    for match in re.finditer(r"```python\n(.*?)```", text, flags=re.S):
        before = text[:match.start()].rstrip("\n")
        paragraph = before.rsplit("\n\n", 1)[-1]
        if RUNS_AS_WRITTEN in paragraph.replace("\n", " "):
            found.append(match.group(1))
    return found


def runnable_examples() -> dict[str, str]:
    """The Quick start and the marked examples of docs/, by id; each found exactly once."""
    quick_start = blocks(README, "python")[0]
    assert README.index("## Quick start") < README.index(quick_start)
    examples = {"quick-start": quick_start}
    for name, path, needle, _ in EXAMPLES[1:]:
        [example] = [b for b in marked_blocks(page(path)) if needle in b]
        examples[name] = example
    return examples


def test_top_of_readme_has_the_two_commands() -> None:
    first_block = re.search(r"```bash\n(.*?)```", README, flags=re.S)
    assert first_block is not None
    commands = [line.split("#")[0].strip() for line in first_block.group(1).splitlines()]
    assert commands == ["make serve", "make test"]
    ci = (ROOT / ".ci/run").read_text()
    assert "make test" in ci


def test_readme_is_a_short_guide() -> None:
    """The README stays an overview; the user's guide lives in docs/ (issue 22)."""
    assert len(README.splitlines()) <= 200


def test_every_marked_example_is_run() -> None:
    """A block marked "runs as written" on any page is one of EXAMPLES, so none is skipped."""
    marked = sum(len(marked_blocks(p.read_text())) for p in sorted(DOCS.glob("*.md")))
    assert marked == len(EXAMPLES) - 1


def test_quick_start_says_which_python() -> None:
    quick_start = README[README.index("## Quick start"):]
    quick_start = quick_start[:quick_start.index("\n## ", 1)]
    assert ".venv/bin/python" in quick_start
    assert "pip install lossd" not in README


@pytest.mark.parametrize(("name", "expect"), [(e[0], e[3]) for e in EXAMPLES],
                         ids=[e[0] for e in EXAMPLES])
def test_example_runs_as_written(name: str, expect: str) -> None:
    example = runnable_examples()[name]
    assert '("127.0.0.1:50051")' in example
    try:
        srv = start_server(port=50051)
    except OSError:
        pytest.skip("port 50051 is taken on this machine; the example hard-codes it")
    try:
        out = subprocess.run([sys.executable, "-c", example], capture_output=True, text=True,
                             timeout=120)
    finally:
        srv.stop(0)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()
    assert expect in out.stdout, out.stdout


def test_plugin_example_is_served_as_written(tmp_path: Path) -> None:
    """The Plugins page's mypkg/losses.py, installed as a module and loaded with --plugin
    (entry points off: the example plugin's charbonnier would take the name), computes the
    Charbonnier loss; the page's "Test it" block passes against it; its Dockerfile block is
    examples/plugin/Dockerfile."""
    plugins = page("docs/plugins.md")
    [module] = [b for b in blocks(plugins, "python") if b.startswith("# mypkg/losses.py")]
    (tmp_path / "mypkg").mkdir()
    (tmp_path / "mypkg" / "__init__.py").write_text("")
    (tmp_path / "mypkg" / "losses.py").write_text(module)
    check = """
import numpy as np
from lossd import LossClient
from lossd_server.app import create_server
from lossd_server.settings import Settings

server = create_server(Settings(port=0, metrics_port=-1, device="cpu",
                                plugins=("mypkg.losses",), entry_points=False)).start()
x = np.array([[0.0, 3.0], [1.0, -1.0]], np.float32)
t = np.array([[0.0, -1.0], [1.0, 1.0]], np.float32)
with LossClient(f"127.0.0.1:{server.port}") as client:
    info = {i.name: i for i in client.losses()}["charbonnier"]
    r = client.evaluate(x, t, loss="charbonnier", eps=0.5)
server.stop(0)
want = np.sqrt((x - t) ** 2 + 0.25).mean(axis=1)
assert info.description == "Charbonnier (smooth L1) loss", info
assert info.source == "mypkg.losses (--plugin)", info.source
assert np.allclose(r.per_sample, want, rtol=1e-6), (r.per_sample, want)
print("served")
"""
    path = os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH")) if p)
    out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "PYTHONPATH": path})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "served"
    # The page's "Test it" block, run as it is against the module.
    [test_it] = [b for b in blocks(plugins, "python") if "create_server(" in b]
    out = subprocess.run([sys.executable, "-c", test_it], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "PYTHONPATH": path})
    assert out.returncode == 0, out.stderr
    [dockerfile] = blocks(plugins, "dockerfile")
    example = (ROOT / "examples" / "plugin" / "Dockerfile").read_text()
    assert dockerfile == example


# --- links --------------------------------------------------------------------------------

def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """The #anchors of a Markdown text's headings (repeats get -1, -2, ... as on GitHub)."""
    seen: dict[str, int] = {}
    found = set()
    for heading in re.findall(r"^#{1,6} (.+)$", strip_fences(text), flags=re.M):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


def strip_fences(text: str) -> str:
    """The text without its fenced blocks (a `# comment` in one is no heading)."""
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def strip_code(text: str) -> str:
    """The text without fenced blocks and inline code (neither holds links)."""
    return re.sub(r"`[^`]*`", "", strip_fences(text))


def links(text: str) -> list[str]:
    """The targets of a Markdown text's links and images."""
    return re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", strip_code(text))


def markdown_files() -> list[str]:
    return LINKED_FILES + [f"docs/{p.name}" for p in sorted(DOCS.glob("*.md"))]


def test_readme_links_every_docs_page() -> None:
    linked = {t.split("#")[0] for t in links(README)}
    on_disk = {f"docs/{p.name}" for p in DOCS.glob("*.md")}
    want = {f"docs/{name}.md" for name in GUIDE_PAGES}
    assert want <= on_disk, sorted(want - on_disk)
    assert on_disk <= linked, f"docs pages the README does not link: {sorted(on_disk - linked)}"
    for target in linked:
        if target.startswith("docs/"):
            assert (ROOT / target).exists(), target


@pytest.mark.parametrize("path", markdown_files())
def test_relative_links_resolve(path: str) -> None:
    source = ROOT / path
    text = source.read_text()
    for target in links(text):
        if re.match(r"[a-z]+:", target):          # https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        resolved = (source.parent / file).resolve() if file else source
        name = resolved.relative_to(ROOT.resolve()).as_posix()
        assert resolved.exists(), f"{path}: {name}: no such file"
        if anchor:
            assert resolved.suffix == ".md", f"{path}: {target}: an anchor into a non-page"
            assert anchor in anchors(resolved.read_text()), f"{path}: {target}: no such heading"


@pytest.mark.parametrize("name", GUIDE_PAGES)
def test_docs_page_opens_with_its_contents(name: str) -> None:
    """Each page: a title, then a list of links to every one of its sections, in order."""
    text = (DOCS / f"{name}.md").read_text()
    lines = text.splitlines()
    assert lines[0].startswith("# "), name
    toc = []
    for line in lines[2:]:
        entry = re.fullmatch(r"- \[.+\]\(#([^)]+)\)", line)
        if entry is None:
            break
        toc.append(entry.group(1))
    sections = [slug(h) for h in re.findall(r"^## (.+)$", strip_fences(text), flags=re.M)]
    assert toc == sections, name
