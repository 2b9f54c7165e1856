"""`python -m finetune.embed`, kept for scripts written before the one command: the same as `finetune embed`."""

from finetune.inference.embed import main

if __name__ == "__main__":
    main()
