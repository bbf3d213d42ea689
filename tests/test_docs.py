"""The documents the code cites exist and say what is cited: every `docs/X.md` and
`docs/X.md#section` named in the code, tests, scripts, bench and docs resolves to a file and a
heading in it; nothing cites a document kept outside the repository; docs/api.md's reference is
generated from the current code and its guide names only things that exist; architecture.md
covers every module."""

import importlib
import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
SOURCES = [*ROOT.glob("rgemma_cli/**/*.py"), *ROOT.glob("tests/*.py"), *ROOT.glob("bench/*.py"),
           *ROOT.glob("scripts/**/*.py"), *DOCS.glob("*.md"), ROOT / "README.md",
           *ROOT.glob("weights/**/README.md"), ROOT / "Makefile"]
CITATION = re.compile(r"docs/([\w.-]+\.md)(?:#([\w-]+))?")
LINK = re.compile(r"\]\(([\w.-]+\.md)?(?:#([\w-]+))?\)")  # markdown links inside docs/
# Documents that lived outside the repository (the background notes docs/ now replaces)
FOREIGN = re.compile(r"spec §|§\s?\d|griffin-spec|perf-notes|perf notes item")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(doc: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", doc.read_text(encoding="utf-8"), flags=re.S)
    return {slug(m) for m in re.findall(r"^#+ (.+)$", text, flags=re.M)}


def citations():
    """(file, line number, cited doc name, section or None) for every citation in the repo."""
    for path in SOURCES:
        if not path.exists() or path.name == "test_docs.py":  # (its examples are not citations)
            continue
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for doc, section in CITATION.findall(line):
                yield path, n, doc, section or None
            if path.parent == DOCS:
                for doc, section in LINK.findall(line):
                    if doc or section:
                        yield path, n, doc or path.name, section or None


def dangling(cites, docs_dir: Path) -> list[str]:
    bad = []
    for path, n, doc, section in cites:
        target = docs_dir / doc
        where = f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}:{n}"
        if not target.exists():
            bad.append(f"{where}: docs/{doc} does not exist")
        elif section and section not in anchors(target):
            bad.append(f"{where}: docs/{doc} has no section #{section}")
    return bad


def test_every_cited_document_and_section_exists():
    cites = list(citations())
    assert len(cites) > 20  # the code does cite its notes
    assert {c[2] for c in cites} >= {"model.md", "kernels.md"}
    bad = dangling(cites, DOCS)
    assert not bad, "dangling doc references:\n" + "\n".join(bad)


def test_the_check_finds_a_dangling_reference(tmp_path):
    (tmp_path / "a.md").write_text("# Title\n\n## The RG-LRU, in `numpy`\n")
    src = tmp_path / "x.py"
    src.write_text("# see docs/a.md#the-rg-lru-in-numpy and docs/a.md#gone and docs/b.md\n")
    found = [(src, 1, doc, sec or None) for doc, sec in CITATION.findall(src.read_text())]
    assert [b.split(": ", 1)[1] for b in dangling(found, tmp_path)] == [
        "docs/a.md has no section #gone", "docs/b.md does not exist"]


def test_nothing_cites_a_document_outside_the_repository():
    bad = [f"{p.relative_to(ROOT)}:{n}: {line.strip()}"
           for p in SOURCES if p.exists() and p.name != "test_docs.py"
           for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
           if FOREIGN.search(line)]
    assert not bad, "cite docs/model.md or docs/kernels.md instead:\n" + "\n".join(bad)


def _gen_api():
    spec = importlib.util.spec_from_file_location("gen_api", ROOT / "scripts/docs/gen_api.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_api_doc_is_current():
    gen_api = _gen_api()
    current = (DOCS / "api.md").read_text(encoding="utf-8")
    assert gen_api.MARKER in current
    assert current == gen_api.render(current), \
        "docs/api.md is stale (the public API changed): run `make docs` (scripts/docs/gen_api.py)"


def test_api_guide_names_only_what_exists():
    guide = (DOCS / "api.md").read_text(encoding="utf-8").split(_gen_api().MARKER)[0]
    modules = {m.split(".", 1)[1] if "." in m else m for m in _gen_api().modules()}
    missing = []
    for module, attr in re.findall(r"`(?:rgemma_cli\.)?([a-z_]+(?:\.[a-z_]+)?)\.([A-Za-z_]\w*)", guide):
        if module not in modules or attr in ("model", "json", "safetensors"):  # file names
            continue
        name = module if module == "rgemma_cli" else f"rgemma_cli.{module}"
        if not hasattr(importlib.import_module(name), attr):
            missing.append(f"{module}.{attr}")
    assert not missing, f"docs/api.md names what the code no longer has: {missing}"


@pytest.mark.parametrize("module", [p.stem for p in (ROOT / "rgemma_cli").glob("*.py")
                                    if p.stem != "__init__"] + ["kernels", "testing"])
def test_architecture_covers_every_module(module):
    assert f"`{module}" in (DOCS / "architecture.md").read_text(encoding="utf-8")
