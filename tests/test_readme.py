"""The README's test command is exactly what CI runs."""
import re

from _parity import REPO_ROOT


def test_ci_runs_the_readme_test_command():
    readme = (REPO_ROOT / "README.md").read_text()
    ci_lines = [line.strip() for line in (REPO_ROOT / ".ci" / "run").read_text().splitlines()]
    ci_command = ci_lines[-1]
    match = re.search(r"The test command is `([^`]+)`", readme)
    assert match, "README must state 'The test command is `...`'"
    assert match.group(1) == ci_command
    assert ci_command in readme.split("```bash")[2]  # the copy-paste set-up line uses it too
