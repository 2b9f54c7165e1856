"""`python -m finetune.merge`, kept for scripts written before the one command: the same as `finetune merge`."""

from finetune.adapters.merge import main

if __name__ == "__main__":
    main()
