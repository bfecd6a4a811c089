"""The README's two first commands are what a new user and CI run."""

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_readme_starts_with_install_run_and_install_test_commands():
    lines = (REPO / "README.md").read_text().splitlines()
    block = lines[lines.index("```bash") + 1 : lines.index("```bash") + 6]
    run_cmd, test_cmd = block[1], block[4]
    assert "pip install" in run_cmd and "python -m hpsearch +experiment=quickstart -m" in run_cmd
    assert "pip install" in test_cmd and "pytest" in test_cmd
    assert test_cmd in (REPO / ".ci" / "run").read_text().splitlines()
