"""Every section (§x.y) and decision (D-nn) the code cites exists in docs/methods.md, with its stable anchor."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "docs" / "methods.md"
CODE_DIRS = ("mergeflow", "tasks", "flows", "benchmarks", "tests")


def _anchors() -> set[str]:
    return set(re.findall(r'<a id="([^"]+)"></a>', SPEC.read_text(encoding="utf-8")))


def _citing_files() -> dict[Path, str]:
    out = {}
    for folder in CODE_DIRS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            text = path.read_text(encoding="utf-8")
            if re.search(r"\bD-\d+\b|methods\.md", text):
                out[path] = text
    return out


def test_every_cited_decision_and_section_has_an_anchor():
    anchors = _anchors()
    missing = []
    for path, text in _citing_files().items():
        where = path.relative_to(ROOT)
        for number in re.findall(r"\bD-(\d+)\b", text):
            if f"d-{int(number)}" not in anchors:
                missing.append(f"{where}: D-{number}")
        if "docs/methods.md" in text:  # bare §x.y in such a file means this document (other docs have their own §)
            for section in re.findall(r"§(\d+(?:\.\d+)?)", text):
                if f"s{section}" not in anchors:
                    missing.append(f"{where}: §{section}")
    assert not missing, "cited but not in docs/methods.md: " + ", ".join(sorted(set(missing)))


def test_the_code_cites_the_document_in_the_repository():
    stale = [str(p.relative_to(ROOT)) for p, text in _citing_files().items() if re.search(r"METHODS(\.md)? ?[§D]", text)]
    assert not stale, f"these cite the old METHODS spec instead of docs/methods.md: {stale}"


def test_decision_ids_are_unique_and_headed():
    text = SPEC.read_text(encoding="utf-8")
    ids = re.findall(r'<a id="(d-\d+)"></a>\n#### (D-\d+) — ', text)
    assert ids and all(a == b.lower() for a, b in ids)
    assert len({a for a, _ in ids}) == len(ids) == len(re.findall(r'<a id="d-\d+"></a>', text))
