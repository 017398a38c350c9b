from conftest import ROOT


def quickstart_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    return [block.split("\n", 1)[1].strip() for block in section.split("```")[1::2]][:2]


def test_ci_runs_the_readme_test_command():
    setup_and_train, setup_and_test = quickstart_commands()
    assert "pneumo-train --config configs/quickstart.yaml" in setup_and_train and "pneumo-evaluate" in setup_and_train
    assert setup_and_test in (ROOT / ".ci" / "run").read_text().splitlines()


def test_the_docs_are_a_front_door_whose_links_resolve():
    """The README stays short enough to read, the performance page a page; every relative link in
    them and in docs/ names a file that exists."""
    import re

    assert len((ROOT / "README.md").read_text()) <= 6000
    assert len((ROOT / "docs" / "performance.md").read_text()) <= 12000
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
            assert (page.parent / target).exists(), f"{page.name} links to {target}"
