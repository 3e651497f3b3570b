"""The README's config reference is the one the config classes generate."""

from pathlib import Path

from dsgd_mpi.config import reference

README = Path(__file__).resolve().parent.parent / "README.md"


def test_config_reference_in_readme_matches_the_schema():
    table = reference().strip()
    text = README.read_text(encoding="utf-8")
    assert table in text, (
        "README.md's config reference is stale: paste the output of "
        '`python -c "from dsgd_mpi.config import reference; print(reference())"`'
    )


def test_readme_starts_with_the_two_commands():
    head = "\n".join(README.read_text(encoding="utf-8").splitlines()[:20])
    assert "make run" in head and "make test" in head
