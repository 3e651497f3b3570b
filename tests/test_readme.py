"""The README is a short user's document whose commands and links all lead somewhere;
docs/config.md is the config reference the schema generates."""

import importlib.util
import re
import shlex
import sys
from pathlib import Path

import pytest

from dsgd_mpi.config import reference

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCUMENTS = [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "jobs" / "README.md",
             ROOT / "studies" / "consensus" / "README.md"]  # fmt: skip
#: Paths in commands that a run writes, not files of the repository.
OUTPUTS = ("runs/", "analysis", "logs/", "/path/")


def test_config_reference_in_docs_matches_the_schema():
    assert reference().strip() in (ROOT / "docs" / "config.md").read_text(encoding="utf-8"), (
        "docs/config.md's config reference is stale: paste the output of "
        '`python -c "from dsgd_mpi.config import reference; print(reference())"`'
    )


def test_readme_starts_with_the_two_commands_and_reads_in_five_minutes():
    lines = README.read_text(encoding="utf-8").splitlines()
    head = "\n".join(lines[:20])
    assert "make run" in head and "make test" in head
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; move reference material to docs/"


@pytest.mark.parametrize("doc", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(doc):
    text = doc.read_text(encoding="utf-8")
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        path = target.split("#")[0]
        if "://" in target or not path:
            continue
        assert (doc.parent / path).exists(), f"{doc.name}: link to {target} leads nowhere"


def _make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text(encoding="utf-8")
    return set(re.findall(r"^([A-Za-z][\w-]*)\s*:(?!=)", text, flags=re.M))


def _commands(doc: Path) -> list[list[str]]:
    """The shell commands of a document's ```bash blocks, split as a shell would."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", doc.read_text(encoding="utf-8"), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                out.append(words)
    return out


def test_every_command_in_the_readme_names_a_target_module_or_file_that_exists():
    sys.path.insert(0, str(ROOT))  # studies.* are modules of the repository, not the package
    targets = _make_targets()
    commands = _commands(README)
    assert len(commands) >= 10
    for words in commands:
        for i, word in enumerate(words):
            if word == "make":
                named = [w for w in words[i + 1 :] if "=" not in w]
                assert not named or named[0] in targets, f"{words}: no make target {named[0]}"
            elif word == "-m" and i + 1 < len(words):
                assert importlib.util.find_spec(words[i + 1]), f"{words}: no module {words[i + 1]}"
            else:
                path = word.split("=", 1)[-1]
                repository_file = re.match(r"(configs|jobs|studies|tests|docs)/\S+", path)
                if repository_file and not path.startswith(OUTPUTS) and "*" not in path:
                    assert (ROOT / path).exists(), f"{words}: no file {path}"
