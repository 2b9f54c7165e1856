"""`python -m finetune.inspect`: the same as `finetune inspect`."""

from finetune.inspect.command import main

if __name__ == "__main__":
    main()
