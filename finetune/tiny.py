"""`python -m finetune.tiny`, kept for scripts written before the one command: the same as `finetune tiny`."""

from finetune.models.tiny import main

if __name__ == "__main__":
    main()
