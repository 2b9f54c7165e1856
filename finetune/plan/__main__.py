"""`python -m finetune.plan`: the same as `finetune plan`."""

from finetune.plan.cli import main

if __name__ == "__main__":
    main()
