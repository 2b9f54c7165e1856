"""`python -m finetune.sweep`, kept for scripts written before the one command: the same as `finetune sweep`."""

from finetune.train.sweep import main

if __name__ == "__main__":
    main()
