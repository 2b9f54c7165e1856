"""finetune.generate on real runs of tiny models: the CLI's greedy output equals plain peft / transformers on the
same rendered prompt, sampling is reproducible by seed, chat mode switches adapters, and bad inputs exit 2/3."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest

from finetune.config.compose import compose
from finetune.inference import generate
from finetune.train.run import run

from helpers import PROJECT, tiny_overrides

PROMPT = "What is a tort?"
N = 8  # max_new_tokens


@pytest.fixture(scope="module")
def runs(tiny_models, tmp_path_factory):
    """Two short LoRA runs on tiny NeoX (different seeds) and one on tiny Neo, trained for real."""
    root = tmp_path_factory.mktemp("generate")

    def train(name: str, arch: str, *extra: str):
        return run(
            compose(
                "demo",
                tiny_overrides(
                    arch,
                    tiny_models[arch],
                    root / name,
                    "trainer.max_steps=2",
                    "sample_generations=0",
                    "eval_before_training=false",
                    *extra,
                ),
            )
        )

    return {"alpha": train("alpha", "neox"), "beta": train("beta", "neox", "seed=7"), "gamma": train("gamma", "neo")}


@pytest.fixture(scope="module")
def session(runs):
    """alpha and beta over one tiny NeoX base, loaded once (tests select the adapter they need)."""
    return generate.load(runs["alpha"], adapters=[runs["alpha"], runs["beta"]])


def cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "finetune.generate", *map(str, args)],
        cwd=PROJECT,
        input=stdin,
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


def peft_greedy(base, adapter, messages: list[dict]) -> str:
    """What plain peft generates greedily from the adapter tokenizer's rendering of `messages`."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(adapter)
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)
    return _greedy(model, tokenizer, text)


def _greedy(model, tokenizer, text: str) -> str:
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")
    out = model.eval().generate(**ids, do_sample=False, max_new_tokens=N, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


def test_cli_greedy_equals_peft(runs, tiny_models):
    result = cli(runs["alpha"], f"prompt={PROMPT}", "input=The tenant broke a window.", f"max_new_tokens={N}")
    assert result.returncode == 0, result.stderr
    expected = peft_greedy(
        tiny_models["neox"],
        runs["alpha"] / "adapter",
        [{"role": "user", "content": PROMPT, "input": "The tenant broke a window."}],
    )
    assert expected.strip()
    assert result.stdout == expected + "\n"  # stdout carries the completion only
    assert "[finetune] generating with adapter alpha (the alpaca template)" in result.stderr


def test_session_greedy_equals_peft(session, runs, tiny_models):
    replies = {}
    for name in ("alpha", "beta"):
        session.use(name)
        expected = peft_greedy(tiny_models["neox"], runs[name] / "adapter", [{"role": "user", "content": PROMPT}])
        replies[name] = session.generate(PROMPT, max_new_tokens=N)
        assert replies[name] == expected
    assert replies["alpha"] != replies["beta"]  # switching changes the model


def test_merged_model_equals_transformers(runs, tiny_models):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.adapters import merge

    merged = merge.main([str(runs["alpha"])])  # our streaming merge -> RUN/merged
    result = cli(runs["alpha"], "merged=true", f"prompt={PROMPT}", f"max_new_tokens={N}")
    assert result.returncode == 0, result.stderr
    tokenizer = AutoTokenizer.from_pretrained(merged)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=False
    )
    assert result.stdout == _greedy(AutoModelForCausalLM.from_pretrained(merged), tokenizer, text) + "\n"
    messages = [{"role": "user", "content": PROMPT}]
    assert result.stdout == peft_greedy(tiny_models["neox"], runs["alpha"] / "adapter", messages) + "\n"


def test_base_folder_without_chat_template_is_continued_raw(tiny_models):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tiny_models["neox"]
    plain = generate.load(folder)
    assert plain.prompting.kind == "raw" and plain.adapters == []
    expected = _greedy(
        AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder), "The court held"
    )
    assert plain.generate("The court held", max_new_tokens=N) == expected
    assert plain.generate("The court held", raw=True, max_new_tokens=N) == expected


def test_sampling_is_reproducible_by_seed_and_beam_search_runs(session, capsys):
    session.use("alpha")
    sample = {"temperature": 1.0, "top_k": 50, "max_new_tokens": N}
    first = session.generate(PROMPT, seed=3, **sample)
    assert session.generate(PROMPT, seed=3, **sample) == first
    assert len({first, *(session.generate(PROMPT, seed=s, **sample) for s in (4, 5, 6))}) > 1  # the seed matters

    beams = session.generate(PROMPT, num_beams=3, max_new_tokens=N, stream=True)
    assert capsys.readouterr().out == beams + "\n"  # beam search cannot stream: printed whole when done


def test_chat_on_piped_stdin_switches_adapters(runs, session):
    first, second = "What is a lien?", "And a tort?"
    lines = f"{first}\n/adapters\n/adapter beta\n{second}\n/adapter nope\n/exit\nnot read\n"
    result = cli(
        runs["alpha"], f"adapters=[{runs['alpha']},{runs['beta']}]", "chat=true", f"max_new_tokens={N}", stdin=lines
    )
    assert result.returncode == 0, result.stderr
    assert "[finetune] adapters: alpha (active), beta" in result.stderr
    assert "[finetune] active adapter: beta (the alpaca template)" in result.stderr
    assert "[finetune] no adapter 'nope'; adapters: alpha, beta (active)" in result.stderr

    # the same conversation in process: alpha answers the first turn, beta the second with the history rendered
    session.use("alpha")
    reply = session.generate(first, max_new_tokens=N)
    assert reply.strip()
    session.use("beta")
    history = [
        {"role": "user", "content": first},
        {"role": "assistant", "content": reply},
        {"role": "user", "content": second},
    ]
    assert result.stdout == reply + "\n" + session.generate(history, max_new_tokens=N) + "\n"


def test_chat_reset_clears_the_history(session, capsys):
    session.use("alpha")
    generate.chat(
        session, {"max_new_tokens": N}, lines=io.StringIO("Define consideration.\n/reset\nDefine consideration.\n")
    )
    reply = session.generate("Define consideration.", max_new_tokens=N)
    captured = capsys.readouterr()
    assert captured.out == 2 * (reply + "\n")  # the second turn is answered as if it were the first
    assert "[finetune] conversation cleared" in captured.err


def test_adapters_on_different_bases_are_refused(runs, capsys):
    with pytest.raises(SystemExit) as exit_info:
        generate.main([str(runs["alpha"]), f"adapters=[{runs['gamma']}]", f"prompt={PROMPT}"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "alpha" in err and "gamma" in err and "must share their base" in err


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        ([f"prompt={PROMPT}", "top_p=0.5"], 2, "only apply when sampling"),
        ([f"prompt={PROMPT}", "system=Be brief."], 2, "the alpaca template has no system message"),
        ([], 2, "give prompt=TEXT"),
        ([f"prompt={PROMPT}", "tempreature=1"], 2, "did you mean 'temperature'"),
        ([f"prompt={PROMPT}", "base={gptj}"], 3, "different checkpoint"),
    ],
)
def test_bad_arguments_are_refused_before_loading(runs, tiny_models, capsys, args, code, message):
    with pytest.raises(SystemExit) as exit_info:
        generate.main([str(runs["alpha"]), *(a.format(gptj=tiny_models["gptj"]) for a in args)])
    assert exit_info.value.code == code
    assert message in capsys.readouterr().err


def test_help_lists_the_options_without_loading_torch():
    result = cli("--help")
    assert result.returncode == 0
    assert all(f"  {option.name}=" in result.stdout for option in generate.OPTIONS)
    probe = subprocess.run(
        [sys.executable, "-c", "import sys, finetune.generate; print('torch' in sys.modules)"],
        cwd=PROJECT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert probe.stdout.strip() == "False"
