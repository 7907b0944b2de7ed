"""Run the `llm` command in-process (fast: no interpreter start-up) and capture its result."""

import sys

import pytest

from llmkit.cli.app import main


def llm(capsys, monkeypatch, *args):
    """-> (exit code, stdout, stderr) of `llm ARGS...`."""
    monkeypatch.setattr(sys, "argv", ["llm", *map(str, args)])
    with pytest.raises(SystemExit) as e:
        main()
    out = capsys.readouterr()
    return e.value.code, out.out, out.err
