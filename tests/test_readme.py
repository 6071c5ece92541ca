"""The README's two commands are what CI and users run: keep them and their claims true."""
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def first_block() -> list[str]:
    text = (REPO / "README.md").read_text()
    return re.search(r"```bash\n(.*?)```", text, re.S).group(1).strip().splitlines()


def test_readme_starts_with_the_quickstart_and_the_test_command():
    setup, tests = first_block()
    assert setup == "pip install -e . && usi quickstart"
    assert tests == "pip install -e '.[test]' && pytest"


def test_ci_runs_the_readme_test_command():
    ci = (REPO / ".ci" / "run").read_text()
    assert "sed -n 2p" in ci and 'eval "$cmd"' in ci and "set -euo pipefail" in ci


def test_readme_names_every_module_of_the_package():
    text = (REPO / "README.md").read_text()
    for path in (REPO / "usi").rglob("*.py"):
        if path.name not in ("__init__.py", "__main__.py", "errors.py", "progress.py"):
            assert path.name in text, f"README architecture section misses {path.name}"
