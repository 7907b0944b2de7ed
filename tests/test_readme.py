"""The README's Python example runs as written (on the real SmolLM2 model)."""

import contextlib
import io
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_api_example() -> str:
    text = README.read_text()
    section = text[text.index("## Python API") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
def test_readme_python_example_runs(smollm_gguf):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(_python_api_example(), str(README), "exec"), {})
    lines = out.getvalue().splitlines()
    assert "Paris" in lines[0]
    assert lines[-1].endswith("True")  # tokenize's ids, then a measured decode speed
    assert lines[-2] == "True"  # detokenize(tokenize(text)) is the text
    completion = next(ln for ln in lines if "'completion_tokens'" in ln)
    assert "Paris" in completion and " stop {" in completion  # the stop string "\n" ended it
    assert lines[-3].strip()  # the streamed chat reply
