"""`python -m finetune.serve`, the same as `finetune serve`."""

from finetune.inference.serve import main

if __name__ == "__main__":
    main()
