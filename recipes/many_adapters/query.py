"""Ask each served adapter the same question with the official `openai` client (any OpenAI-compatible client works).

    python recipes/many_adapters/query.py --url http://127.0.0.1:8000/v1 --question "What is a tort?"

Waits for the server's /health, lists the served models, then asks every adapter (and the base) through
/v1/chat/completions, greedy, so the answers are reproducible. The key, if the server has one, comes from
$FINETUNE_API_KEY, as the server's does.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import urllib.request

import openai


def wait_until_healthy(url: str, seconds: float) -> None:
    health = url.removesuffix("/v1") + "/health"
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(health, timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            if time.monotonic() > deadline:
                sys.exit(f"{health} did not answer within {seconds:.0f} s")
            time.sleep(0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--question", default="What is a force majeure clause?")
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--wait", type=float, default=300, help="seconds to wait for the server to load")
    args = parser.parse_args()
    wait_until_healthy(args.url, args.wait)
    client = openai.OpenAI(base_url=args.url, api_key=os.environ.get("FINETUNE_API_KEY", "none"))
    models = client.models.list().data
    print("served:", ", ".join(m.id for m in models))
    for model in models:
        if model.parent is None:  # a base continues raw text: ask it through /v1/completions
            answer = client.completions.create(
                model=model.id, prompt=args.question, max_tokens=args.max_tokens, temperature=0
            )
            text = answer.choices[0].text
        else:
            answer = client.chat.completions.create(
                model=model.id,
                messages=[{"role": "user", "content": args.question}],
                max_tokens=args.max_tokens,
                temperature=0,
            )
            text = answer.choices[0].message.content
        print(f"{model.id} ({answer.usage.completion_tokens} tokens, {answer.choices[0].finish_reason}): {text!r}")


if __name__ == "__main__":
    main()
