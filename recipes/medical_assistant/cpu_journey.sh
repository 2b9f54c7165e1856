#!/usr/bin/env bash
# The medical-assistant journey on CPU, offline, end to end: LoRA on Alpaca-format medical Q&A -> before/after report
# -> merged export for serving (vLLM cannot load a LoRA adapter for NeoX/GPT-J) -> generate from it -> push (dry run).
# The tiny GPT-NeoX (Pythia's architecture; built once, cached) stands in for Pythia-6.9B, medical_qa.jsonl for your
# data, one epoch for three; every other argument is the GPU recipe's (README.md here).
#   bash recipes/medical_assistant/cpu_journey.sh [RUN_DIR]   (about 2 minutes on 2 cores, plus about 2 to build the tiny model once)
source "$(dirname "$0")/../journey.sh"
RUN=${1:-runs/medical-cpu}

step python -m finetune conf=demo model=tiny_neox data=alpaca data.path=recipes/medical_assistant/medical_qa.jsonl \
     trainer.num_train_epochs=1 card.domain=medical output_dir="$RUN" overwrite=true
step python -m finetune.evaluate "$RUN" generate_rows=8 max_new_tokens=32 samples=2
step python -m finetune.merge "$RUN" overwrite=true
step python -m finetune.generate "$RUN" merged=true prompt="What is hypertension?" max_new_tokens=24
step python -m finetune.push "$RUN" merged=true repo_id=your-name/pythia-medical dry_run=true
