"""`python -m finetune.generate`, kept for scripts written before the one command: the same as `finetune generate`."""

from finetune.inference.generate import main

if __name__ == "__main__":
    main()
