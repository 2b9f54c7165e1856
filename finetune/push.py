"""`python -m finetune.push`, kept for scripts written before the one command: the same as `finetune push`."""

from finetune.adapters.push import main

if __name__ == "__main__":
    main()
