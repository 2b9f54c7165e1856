"""`python -m finetune.checkpoints`, kept for scripts written before the one command: the same as
`finetune checkpoints`."""

from finetune.runs.checkpoints import main

if __name__ == "__main__":
    main()
