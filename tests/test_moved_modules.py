"""Issue 23: the application moved into ``fastmaml.app``; its old module names keep working.

``fastmaml/_moved.py`` holds the one table of moves. An old name must import as the new module
object itself (not a copy: monkeypatching either name patches both), an installed console script of
an older fastmaml (``from fastmaml.cli import main``) must still run, and no entry of the table may
point at a module that does not exist. The library must not import the application.
"""

import importlib
import pathlib
import re
import subprocess
import sys

import pytest

from fastmaml import _moved
from test_cli import subprocess_env

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("old, new", sorted(_moved.MOVED.items()))
def test_an_old_name_is_the_new_module(old, new):
    assert importlib.util.find_spec(new) is not None, f"{old} -> {new}: no such module"
    module = importlib.import_module(old)
    assert module is importlib.import_module(new) and sys.modules[old] is module
    assert module.__name__ == new and module.__spec__.name == new  # the real module, under its own name
    parent, short = old.rsplit(".", 1)
    assert getattr(importlib.import_module(parent), short) is module  # `from fastmaml import train`


def test_every_entry_points_at_a_module_that_exists():
    for old, new in _moved.MOVED.items():
        assert old.startswith("fastmaml.") and new.startswith("fastmaml."), (old, new)
        path = ROOT / (new.replace(".", "/") + ".py")
        assert path.is_file(), f"_moved.MOVED[{old!r}] = {new!r}, but {path} does not exist"
        assert not (ROOT / (old.replace(".", "/") + ".py")).exists(), f"{old}: a file and an alias"


def test_old_names_share_attributes_and_monkeypatching(monkeypatch):
    import fastmaml.app.evaluate
    import fastmaml.evaluate as old_evaluate
    from fastmaml.app.errors import UserError
    from fastmaml.configs import UserError as old_user_error
    from fastmaml.train import build_learner

    assert old_user_error is UserError
    assert build_learner is fastmaml.app.run_setup.build_learner
    monkeypatch.setattr(old_evaluate, "CI_NOTE", "patched")
    assert fastmaml.app.evaluate.CI_NOTE == "patched"


def test_an_old_console_script_and_python_m_still_run():
    """The script pip wrote for fastmaml <= issue 22 (`from fastmaml.cli import main`), and
    `python -m fastmaml.cli`, both run the command."""
    script = "import sys\nfrom fastmaml.cli import main\nsys.argv = ['fastmaml', '--version']\nsys.exit(main())\n"
    for argv in ([sys.executable, "-c", script], [sys.executable, "-m", "fastmaml.cli", "--version"]):
        r = subprocess.run(argv, capture_output=True, text=True, env=subprocess_env(), timeout=300)
        assert r.returncode == 0 and r.stdout.startswith("fastmaml "), (argv[1:], r.stdout, r.stderr)


def test_the_library_does_not_import_the_application():
    """No module of fastmaml/ outside fastmaml/app/ (and the entry points __main__.py, _moved.py)
    imports the application, by its new or its old names."""
    app = {m.stem for m in (ROOT / "fastmaml" / "app").glob("*.py")} | {
        old.rsplit(".", 1)[1] for old, new in _moved.MOVED.items() if new.startswith("fastmaml.app.")}
    names = "|".join(sorted(app - {"__init__"}))
    pattern = re.compile(rf"^\s*(from\s+(fastmaml\.app|\.+app)\b|import\s+fastmaml\.app\b"
                         rf"|from\s+(fastmaml|\.+)\s+import\s+.*\b(app|{names})\b"
                         rf"|from\s+(fastmaml|\.+)\.({names})\b|import\s+fastmaml\.({names})\b)", re.M)
    found = []
    for path in sorted((ROOT / "fastmaml").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith("fastmaml/app/") or rel in ("fastmaml/__main__.py", "fastmaml/_moved.py"):
            continue
        found += [f"{rel}: {m.group(0).strip()}" for m in pattern.finditer(path.read_text())]
    assert not found, "the library imports the application:\n" + "\n".join(found)


def test_importing_the_library_loads_no_application_module():
    code = ("import sys, fastmaml, fastmaml.maml, fastmaml.algorithms, fastmaml.engine, fastmaml.distributed, "
            "fastmaml.models, fastmaml.data, fastmaml.kernels, fastmaml.compat.higher; fastmaml.MAML; "
            "print(sorted(m for m in sys.modules if m.startswith('fastmaml.app')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "[]", (r.stdout, r.stderr)
