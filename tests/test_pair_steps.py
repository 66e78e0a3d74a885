"""scripts/pair_steps.py, the developers' paired step timing: its copies of
fastmlp import under their new names, and bad revisions are usage errors.
(Timing itself compiles two versions, minutes: it is run by hand.)"""
import importlib
import os
import subprocess
import sys

import pytest

from conftest import load_script

ROOT = os.path.join(os.path.dirname(__file__), "..")


def in_git_checkout():
    return subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"],
                          capture_output=True).returncode == 0


@pytest.mark.parametrize("revision", ["HEAD", "worktree"])
def test_a_copy_imports_under_its_own_name(revision, tmp_path, monkeypatch):
    if revision == "HEAD" and not in_git_checkout():
        pytest.skip("not a git checkout")
    script = load_script("pair_steps")
    name = f"fastmlp_copy_{revision.lower()}"
    parent = script.package_copy(revision, name, str(tmp_path / "cache"),
                                 str(tmp_path / "scratch"))
    monkeypatch.syspath_prepend(parent)
    try:
        step = importlib.import_module(name + ".step")
        assert os.path.dirname(step.__file__) == os.path.join(parent, name)
        assert hasattr(step, "train_steps")
        # its modules are its own, not fastmlp's
        assert importlib.import_module(name + ".kernels") is not importlib.import_module(
            "fastmlp.kernels")
    finally:
        for module in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
            del sys.modules[module]


def test_an_unknown_revision_is_a_usage_error(capsys):
    if not in_git_checkout():
        pytest.skip("not a git checkout")
    with pytest.raises(SystemExit) as exit_:
        load_script("pair_steps").main(["--before", "no-such-revision"])
    assert exit_.value.code == 2
    assert "'no-such-revision' is not a git revision" in capsys.readouterr().err
