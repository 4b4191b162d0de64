"""The README's quick start and CI's command are the same commands; the docs name only what natpg has."""

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


def _resolves(dotted: str) -> bool:
    """Whether ``natpg.a.b.C`` (a module path, then attributes) names something natpg has."""
    import importlib

    parts = dotted.split(".")
    for k in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:k]))
        except ImportError:
            continue
        for attribute in parts[k:]:
            if not hasattr(obj, attribute):
                return False
            obj = getattr(obj, attribute)
        return True
    return False


def test_the_docs_name_only_what_natpg_has():
    """Every `natpg.x.y` the README and docs/ name, every `module.Class` of a natpg module (`fisher.KFAC`,
    `acktr.KFACRegression`) and every `from natpg... import name` in their examples exists: a renamed class or a
    moved function fails here, not in a reader's hands."""
    import pkgutil

    import natpg

    modules: dict[str, list[str]] = {}  # short name → full names (natpg.bench and natpg.distributed.bench)
    for info in pkgutil.walk_packages(natpg.__path__, "natpg."):
        modules.setdefault(info.name.rsplit(".", 1)[-1], []).append(info.name)
    checked, missing = 0, []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = path.read_text()
        names = re.findall(r"`(natpg(?:\.\w+)+)", text)
        for m in re.finditer(r"^\s*from (natpg[\w.]*) import ([\w, ]+)", text, re.M):
            names += [f"{m.group(1)}.{name.split(' as ')[0].strip()}" for name in m.group(2).split(",") if name.strip()]
        for short, rest in re.findall(r"`([a-z_]+)\.([A-Z]\w*(?:\.\w+)*)", text):
            if short in modules:
                checked += 1
                if not any(_resolves(f"{full}.{rest}") for full in modules[short]):
                    missing.append(f"{path.name}: {short}.{rest}")
        checked += len(names)
        missing += [f"{path.name}: {name}" for name in names if not _resolves(name)]
    assert checked > 100 and not missing, missing
