"""`python -m llmkit ...` is the `llm` command (what `torchrun -m llmkit` and `llm run --tp N`
start on every rank)."""

from llmkit.cli.app import main

if __name__ == "__main__":
    main()
