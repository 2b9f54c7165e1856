#!/usr/bin/env bash
# Two domain adapters over one base, served from one load: finetune.generate loads the base once with both adapters
# and switches between them (/adapter NAME, NAME being the run directory's name). Trains the legal and medical
# adapters first (their cpu_journey.sh scripts) unless both run directories already hold one.
#   bash recipes/many_adapters/cpu_journey.sh [LEGAL_RUN] [MEDICAL_RUN]   (seconds, or ~5 minutes with the trainings)
source "$(dirname "$0")/../journey.sh"
LEGAL=${1:-runs/legal-cpu}
MEDICAL=${2:-runs/medical-cpu}
[[ -f "$LEGAL/adapter/adapter_model.safetensors" ]] || bash recipes/legal_assistant/cpu_journey.sh "$LEGAL"
[[ -f "$MEDICAL/adapter/adapter_model.safetensors" ]] || bash recipes/medical_assistant/cpu_journey.sh "$MEDICAL"

# a chat on stdin, one message or command per line
printf '%s\n' "What is a force majeure clause?" "/adapter $(basename "$MEDICAL")" "What is hypertension?" "/adapters" "/exit" |
  step python -m finetune.generate "$LEGAL" adapters="[$MEDICAL]" chat=true max_new_tokens=24
