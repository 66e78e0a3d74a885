"""The manual runs as written: every ```python block of README.md and docs/
executes in a fresh interpreter, and README.md stays a manual's length."""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCUMENTS = ["README.md"] + [os.path.join("docs", name)
                             for name in sorted(os.listdir(os.path.join(ROOT, "docs")))
                             if name.endswith(".md")]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks():
    for document in DOCUMENTS:
        text = open(os.path.join(ROOT, document)).read()
        for number, match in enumerate(BLOCK.finditer(text), 1):
            line = text[:match.start()].count("\n") + 1
            yield pytest.param(match.group(1), id=f"{document}:{line}")


@pytest.mark.parametrize("code", list(python_blocks()))
def test_python_blocks_run(code, tmp_path):
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def test_readme_is_a_manual_not_a_diary():
    text = open(os.path.join(ROOT, "README.md")).read()
    assert len(text) <= 15000, f"README.md has {len(text)} characters"
    assert len(list(BLOCK.finditer(text))) >= 2
