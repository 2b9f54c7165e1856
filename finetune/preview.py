"""`python -m finetune.preview`, kept for scripts written before the one command: the same as `finetune preview`."""

from finetune.data.preview import main

if __name__ == "__main__":
    main()
