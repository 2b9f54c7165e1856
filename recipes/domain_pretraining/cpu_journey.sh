#!/usr/bin/env bash
# Continued pretraining on the bundled corpus, merge, then instruction tuning on the merged model: the tiny GPT-Neo
# stands in for GPT-Neo 1.3B, one epoch each. Every other argument is the GPU recipe's (README.md here).
#   bash recipes/domain_pretraining/cpu_journey.sh [RUN_DIR]   (about 2 minutes on 2 cores, plus about 2 to build the tiny model once)
source "$(dirname "$0")/../journey.sh"
RUN=${1:-runs/dapt-cpu}

step python -m finetune conf=demo model=tiny_neo data=completion data.path='recipes/domain_pretraining/corpus/*.txt' \
     data.max_length=256 strategy.r=32 strategy.lora_alpha=64 trainer.num_train_epochs=1 output_dir="$RUN" overwrite=true
step python -m finetune.merge "$RUN" overwrite=true
step python -m finetune conf=demo model=tiny_neo model.name_or_path="$RUN/merged" model.tiny=null model.hub_id=null \
     data=alpaca data.path=recipes/legal_assistant/contracts_qa.csv data.columns.instruction=question \
     data.columns.input=clause data.columns.output=answer trainer.num_train_epochs=1 output_dir="$RUN-legal" overwrite=true
step python -m finetune.evaluate "$RUN-legal" generate_rows=4 max_new_tokens=32 samples=1
