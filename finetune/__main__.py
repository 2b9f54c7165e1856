"""`python -m finetune ...`: the same as the `finetune` command (finetune.cli)."""

from finetune.cli import main

if __name__ == "__main__":
    main()
