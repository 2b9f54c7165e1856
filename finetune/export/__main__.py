"""`python -m finetune.export`: the same as `finetune export`."""

from finetune.export.command import main

if __name__ == "__main__":
    main()
