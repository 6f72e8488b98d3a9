"""CI must run exactly the README's test command."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    commands = [line.split("#")[0].strip() for line in readme.splitlines() if line.rstrip().endswith("# tests")]
    assert len(commands) == 1, "README needs exactly one line ending in '# tests'"
    assert commands[0] in (ROOT / ".ci" / "run").read_text()
