#!/usr/bin/env bash
# Two domain adapters over one base, from one load: finetune.generate loads the base once with both adapters and
# switches between them (/adapter NAME, NAME being the run directory's name); then finetune serve puts both behind
# one OpenAI-compatible endpoint and the openai client asks each (query.py). Trains the legal and medical
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

# both adapters behind one OpenAI-compatible server over one base; the openai client asks each, then SIGTERM stops it
PORT=${PORT:-$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
serve_in_background python -m finetune serve "$LEGAL" "$MEDICAL" port="$PORT"
step python recipes/many_adapters/query.py --url "http://127.0.0.1:$PORT/v1" --question "What is a force majeure clause?"
stop_server
