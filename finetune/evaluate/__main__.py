"""`python -m finetune.evaluate`: the same as `finetune evaluate`."""

from finetune.evaluate.run import main

if __name__ == "__main__":
    main()
