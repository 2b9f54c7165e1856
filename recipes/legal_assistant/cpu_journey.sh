#!/usr/bin/env bash
# The legal-assistant journey on CPU, offline, end to end: preview -> LoRA -> evaluate against the base -> model
# card with the legal cautions -> push (dry run). The tiny GPT-NeoX (built once, cached) stands in for GPT-NeoX-20B,
# contracts_qa.csv for your own contract Q&A, one epoch for three; every other argument is the GPU recipe's (README.md).
#   bash recipes/legal_assistant/cpu_journey.sh [RUN_DIR]   (about 2 minutes on 2 cores, plus about 2 to build the tiny model once)
source "$(dirname "$0")/../journey.sh"
RUN=${1:-runs/legal-cpu}
DATA=(data=alpaca data.path=recipes/legal_assistant/contracts_qa.csv
      data.columns.instruction=question data.columns.input=clause data.columns.output=answer)

step python -m finetune.preview conf=demo model=tiny_neox "${DATA[@]}" n=1 --no-color
step python -m finetune conf=demo model=tiny_neox "${DATA[@]}" trainer.num_train_epochs=1 card.domain=legal \
     output_dir="$RUN" overwrite=true
step python -m finetune.evaluate "$RUN" generate_rows=8 max_new_tokens=32 samples=2
step python -m finetune.push "$RUN" repo_id=your-name/neox-legal-lora dry_run=true
