from conftest import ROOT


def quickstart_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    return [block.split("\n", 1)[1].strip() for block in section.split("```")[1::2]][:2]


def test_ci_runs_the_readme_test_command():
    setup_and_train, setup_and_test = quickstart_commands()
    assert "pneumo-train --config configs/quickstart.yaml" in setup_and_train and "pneumo-evaluate" in setup_and_train
    assert setup_and_test in (ROOT / ".ci" / "run").read_text().splitlines()
