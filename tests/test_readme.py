"""The README's quick start and CI's command are the same commands."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, flags=re.S)
    test_cmd = next(b for b in blocks if "pytest" in b)
    ci = (ROOT / ".ci" / "run").read_text()
    install_and_test = test_cmd.split(" && ", 2)[2]  # after venv creation and activation
    assert install_and_test in ci


def test_readme_quick_start_trains_the_default_agent():
    readme = (ROOT / "README.md").read_text()
    assert "natpg train npg CartPole-v1" in readme
