"""report.html (`finetune report`): one self-contained page per run and per sweep. Built for a real tiny run with every
section's source present (the attention maps drawn for real, the page rebuilt by inspect's hook), checked for
inline-only content and escaping of hostile strings, then rendered by headless Chromium at a phone's width: a
screenshot that is not blank, the DOM it built, and, over the DevTools protocol on a pipe (no websocket), every image
decoded, nothing wider than the screen and no console error. The browser checks are shown to catch a broken page.
Needs Debian's `chromium` (README: the test set-up installs it)."""

from __future__ import annotations

import base64
import contextlib
import html
import io
import json
import os
import re
import select
import shutil
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path

import matplotlib.image
import pytest

from finetune import cli
from finetune.runs import checkpoints, page, report

HOSTILE = '</pre><script>alert(1)</script><img src=x onerror="alert(2)"><a href="https://evil.example/">x</a> &amp;'
RUN_NAME = "run <script>alert(3)<b>&amp;\"'"  # a legal folder name (no / or =)
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--host-resolver-rules=MAP * ~NOTFOUND",  # should the page ask for anything, no request reaches the network
]
RUN_SECTIONS = ["config", "data", "loss", "evaluation", "samples", "attention", "exports", "serving", "card"]
EXTERNAL = re.compile(r"""\b(?:src|href)\s*=\s*["']?\s*(?:[a-z]+:)?//""", re.IGNORECASE)


@pytest.fixture(scope="module")
def full_run(tiny_run, tmp_path_factory) -> Path:
    """A copy of the tiny run under a hostile name with every section's source: samples, an evaluation report and
    two exports written here (their formats as evaluate and export write them), hostile text in them and in the
    card, and attention maps drawn by `finetune inspect attention`, whose hook rebuilds the page."""
    run_dir = tmp_path_factory.mktemp("report") / RUN_NAME
    shutil.copytree(tiny_run, run_dir, ignore=shutil.ignore_patterns("checkpoints", "tensorboard"))
    samples = [{"prompt": HOSTILE, "before": "", "after": f"after {HOSTILE}"}]
    _write_json(run_dir / "samples.json", {"samples": samples, "decoding": {"do_sample": False}})
    metrics = {"loss": {"base": 6.25, "finetuned": 5.5}, "perplexity": {"base": 518.0, "finetuned": 244.7}}
    data = {"rows": 32, "source": "held-out split of the run", "warnings": [HOSTILE]}
    _write_json(run_dir / "eval_report.json", {"metrics": metrics, "data": data})
    shutil.copyfile(run_dir / "loss.png", run_dir / "eval_report.png")
    gate = {"engine": "llama.cpp", "reference": "transformers eager float32", "precision": "full", "tokens": 32}
    gate |= {"prompts": [{}, {}], "max_abs_diff": 2.1e-5, "tolerance": 1e-3, "greedy_identical": 2, "reasons": []}
    files = [{"name": "model-f32.gguf", "bytes": 3 * 2**20}]
    _write_json(
        run_dir / "exports" / "gguf-f32" / "export.json",
        {"format": "gguf", "quant": "f32", "engine": "llama.cpp", "files": files, "gate": gate, "valid": True},
    )
    failed = {**gate, "engine": "onnxruntime", "top1_agreement": 0.5, "passed": False, "reasons": [HOSTILE]}
    _write_json(
        run_dir / "exports" / "onnx-int8.invalid" / "export.json",
        {"format": "onnx", "quant": "int8", "files": files, "gate": failed, "valid": False},
    )
    card = run_dir / "adapter" / "README.md"
    card.write_text(card.read_text() + f"\n## Notes\n\n{HOSTILE}\n\n| a | b |\n|---|---|\n| {HOSTILE} | `x` |\n")
    checkpoints.update_manifest(card.parent, ["README.md"])  # as card.refresh records a rewritten card
    cli.main(["inspect", "attention", str(run_dir), "prompt=What is a tort?", "layers=0", "heads=0,1"])
    return run_dir


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


class Tags(HTMLParser):
    """Every start tag of a page with its attributes, as a browser's tokenizer would see them."""

    def __init__(self, text: str):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def of(self, name: str) -> list[dict]:
        return [attrs for tag, attrs in self.tags if tag == name]


def sections(text: str) -> list[str]:
    return [attrs["id"] for attrs in Tags(text).of("section")]


def inline_pngs(text: str) -> list:
    """Each <img>'s data: URI decoded and read as a PNG (matplotlib's reader fails on anything else)."""
    images = []
    for attrs in Tags(text).of("img"):
        prefix, _, data = attrs["src"].partition(",")
        assert prefix == "data:image/png;base64", attrs["src"][:60]
        raw = base64.b64decode(data, validate=True)
        assert raw.startswith(page.PNG_MAGIC)
        images.append(matplotlib.image.imread(io.BytesIO(raw), format="png"))
    return images


def test_training_writes_the_page_with_the_sections_it_has(tiny_run):
    text = (tiny_run / report.PAGE).read_text()
    assert page.GENERATOR in text and 'name="viewport"' in text and page.POLICY in text
    assert sections(text) == ["config", "data", "loss", "evaluation", "serving", "card"]  # no samples (0 asked for)
    assert "lora" in text and "train rows" in text and "perplexity" in text and "Data accounting" in text


def test_every_section_inline_and_every_string_escaped(full_run):
    text = (full_run / report.PAGE).read_text()  # rebuilt by inspect's hook, not by the report command
    assert sections(text) == RUN_SECTIONS
    assert not EXTERNAL.search(text) and "<script" not in text.lower()
    tags = Tags(text)
    assert {tag for tag, _ in tags.tags} <= {
        *("html", "head", "meta", "title", "style", "body", "main", "h1", "h2", "h3", "h4", "h5", "h6", "nav"),
        *("a", "section", "p", "pre", "div", "b", "table", "tr", "th", "td", "img", "details", "summary", "span"),
        *("code", "strong", "ul", "li", "blockquote"),
    }
    assert not [name for _, attrs in tags.tags for name in attrs if name.startswith("on")]
    assert all(attrs["href"].startswith("#") for attrs in tags.of("a"))
    images = inline_pngs(text)
    assert len(images) == 3 and all(image.shape[0] > 100 for image in images)  # loss, eval_report, attention
    assert html.escape(HOSTILE) in text and html.escape(RUN_NAME) in text and "&lt;script&gt;" in text
    assert "What is a tort?" in text and "fine-tuned distance (tokens)" in text  # inspect's real attention.json
    assert "gguf-f32: <span class=pass>passed</span>" in text and "onnx-int8.invalid: <span class=fail>FAILED" in text
    assert "2.1e-05" in text and "2/2 prompts, 32 tokens" in text
    assert "<td>vLLM</td>" in text and "<h4>Notes</h4>" in text and "<code>x</code>" in text
    assert "held-out perplexity" in text and "<strong>Warning:</strong>" in text


def test_a_report_html_we_did_not_write_is_never_replaced(tiny_run, tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copyfile(tiny_run / "run.json", run_dir / "run.json")
    (run_dir / report.PAGE).write_text("<html>my own page</html>")
    with pytest.raises(SystemExit) as exit_:
        cli.main(["report", str(run_dir)])
    assert exit_.value.code == 2 and "not written by neo-finetune" in capsys.readouterr().err
    assert report.refresh(run_dir) is None and "warning:" in capsys.readouterr().err  # said, never raised
    assert (run_dir / report.PAGE).read_text() == "<html>my own page</html>"
    (run_dir / report.PAGE).unlink()
    for _ in range(2):  # written, then replaced: it is ours now
        cli.main(["report", str(run_dir)])
        assert capsys.readouterr().out.strip() == str(run_dir / report.PAGE)
    assert sorted(p.name for p in run_dir.iterdir()) == [report.PAGE, "run.json"]  # no temporary file left
    with pytest.raises(SystemExit) as exit_:
        cli.main(["report", str(tmp_path / "nothing")])
    assert exit_.value.code == 2


def test_sweep_page_compares_the_jobs(tiny_run, tmp_path):
    sweep = tmp_path / "sweep"
    record = json.loads((tiny_run / "run.json").read_text())
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    for job, rank, status in (("0", 8, "completed"), ("1", 16, "completed"), ("2", 32, "failed:config")):
        (sweep / job).mkdir(parents=True)
        overrides = [f"strategy.r={rank}", f"output_dir={sweep / job}"]
        failure = {"exit_code": 2, "error": "boom <b>bad</b>"} if status != "completed" else {}
        _write_json(sweep / job / "run.json", {**record, "status": status, "overrides": overrides, **failure})
        if status == "completed":
            history = [{**h, "loss": h["loss"] * rank / 8} if "loss" in h else h for h in metrics["history"]]
            _write_json(sweep / job / "metrics.json", {**metrics, "history": history})
    report.build(sweep / "0")
    cli.main(["report", str(sweep)])
    text = (sweep / report.PAGE).read_text()
    assert sections(text) == ["jobs", "loss"] and "<th>strategy.r</th>" in text and "output_dir" not in text
    assert '<td><a href="0/report.html">0</a></td>' in text and "<td>1</td>" in text  # 1/ has no page yet
    assert "job 2: failed:config (exit 2): boom &lt;b&gt;bad&lt;/b&gt;" in text and "best: job 0" in text
    assert not EXTERNAL.search(text)
    (overlay,) = inline_pngs(text)
    assert overlay.shape[:2] == (500, 800) and overlay[..., :3].std() > 0.05


class DevTools:
    """The Chrome DevTools protocol over --remote-debugging-pipe, no websocket and no port: Chromium reads commands
    on its fd 3 and writes replies and events on its fd 4, each a JSON message ended by a NUL byte."""

    def __init__(self, profile: Path, log: Path):
        commands, self.commands = os.pipe()
        self.replies, replies = os.pipe()
        argv = [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--remote-debugging-pipe", "about:blank"]
        with log.open("w") as stderr:
            self.process = subprocess.Popen(
                ["bash", "-c", f'exec "$@" 3<&{commands} 4>&{replies}', "chromium", *argv],
                pass_fds=(commands, replies),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )
        os.close(commands)
        os.close(replies)
        self.buffer, self.events, self.sent = b"", [], 0

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 30) -> dict:
        self.sent += 1
        message = {
            "id": self.sent,
            "method": method,
            "params": params or {},
            **({"sessionId": session} if session else {}),
        }
        os.write(self.commands, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._receive(timeout)
            if reply.get("id") == self.sent:
                assert "error" not in reply, reply
                return reply["result"]
            self.events.append(reply)

    def wait_for(self, event: str, timeout: float = 30) -> None:
        while not any(e.get("method") == event for e in self.events):
            self.events.append(self._receive(timeout))

    def _receive(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while b"\0" not in self.buffer:
            ready, _, _ = select.select([self.replies], [], [], max(0.0, deadline - time.monotonic()))
            assert ready, f"chromium did not answer within {timeout} s"
            chunk = os.read(self.replies, 1 << 20)
            assert chunk, "chromium closed the DevTools pipe"
            self.buffer += chunk
        message, _, self.buffer = self.buffer.partition(b"\0")
        return json.loads(message)

    def close(self) -> None:
        with contextlib.suppress(AssertionError, OSError):
            self.send("Browser.close", timeout=10)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self.commands)
        os.close(self.replies)


LAYOUT = """(async () => {
  const images = [...document.images];
  const decoded = await Promise.all(images.map((i) => i.decode().then(() => true, () => false)));
  return {decoded, sizes: images.map((i) => [i.naturalWidth, i.naturalHeight, i.getBoundingClientRect().width]),
          width: innerWidth, scroll: document.documentElement.scrollWidth, scripts: document.scripts.length,
          sections: [...document.querySelectorAll("section")].map((s) => s.id)};
})()"""


def in_browser(path: Path, tmp: Path) -> dict:
    """Load the page in Chromium as a phone (400 px wide, mobile viewport rules): what its layout and images came to,
    and every error the console received while it loaded."""
    tools = DevTools(tmp / "profile", tmp / "chromium.log")
    try:
        target = tools.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = tools.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            tools.send(f"{domain}.enable", session=session)
        metrics = {"width": 400, "height": 900, "deviceScaleFactor": 1, "mobile": True}
        tools.send("Emulation.setDeviceMetricsOverride", metrics, session=session)
        tools.send("Page.navigate", {"url": path.as_uri()}, session=session)
        tools.wait_for("Page.loadEventFired")
        found = tools.send(
            "Runtime.evaluate", {"expression": LAYOUT, "awaitPromise": True, "returnByValue": True}, session=session
        )
        assert "exceptionDetails" not in found, found
        errors = [
            e["params"]
            for e in tools.events
            if e.get("method") == "Runtime.exceptionThrown"
            or e.get("method") == "Log.entryAdded"
            and e["params"]["entry"]["level"] == "error"
            or e.get("method") == "Runtime.consoleAPICalled"
            and e["params"]["type"] == "error"
        ]
        return {**found["result"]["value"], "errors": errors}
    finally:
        tools.close()


def headless(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    """One headless Chromium run with its console sent to stderr (--enable-logging=stderr --v=0)."""
    return subprocess.run(
        [
            CHROMIUM,
            *FLAGS,
            f"--user-data-dir={tmp}",
            "--enable-logging=stderr",
            "--v=0",
            "--window-size=400,900",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )


def console_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "CONSOLE" in line or "Refused to" in line]


def test_chromium_renders_the_page_at_phone_width(full_run, tmp_path):
    assert Path(CHROMIUM).is_file(), "the browser test needs Debian's chromium: apt-get install -y chromium"
    page_path = full_run / report.PAGE
    shot = tmp_path / "phone.png"
    out = headless(tmp_path / "shot", f"--screenshot={shot}", page_path.as_uri())
    assert not console_lines(out.stderr), console_lines(out.stderr)
    pixels = matplotlib.image.imread(shot)[..., :3]
    assert pixels.shape[:2] == (900, 400)
    assert pixels.std() > 0.05 and (pixels.mean(-1) < 0.5).mean() > 0.005  # text and tables, not a blank page
    dom = headless(tmp_path / "dom", "--dump-dom", "--virtual-time-budget=5000", page_path.as_uri())
    assert not console_lines(dom.stderr), console_lines(dom.stderr)
    tags = Tags(dom.stdout)
    assert [a["id"] for a in tags.of("section")] == RUN_SECTIONS and not tags.of("script")
    assert len(tags.of("img")) == 3 and html.escape(HOSTILE, quote=False) in dom.stdout
    seen = in_browser(page_path, tmp_path)
    assert seen["errors"] == [] and seen["scripts"] == 0 and seen["sections"] == RUN_SECTIONS
    assert seen["decoded"] == [True] * 3, seen
    assert all(width > 0 and height > 0 and 0 < shown <= 400 for width, height, shown in seen["sizes"]), seen
    assert seen["width"] == 400 and seen["scroll"] <= 400, seen  # the viewport meta works; nothing wider than it


def test_the_browser_checks_catch_a_broken_page(tmp_path):
    """The same checks on a page that breaks each rule: a PNG that does not decode, an image from the network (the
    page's policy refuses it: a console error), and a block wider than a phone."""
    broken = '<img alt="torn" src="data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAA">'
    remote = '<img alt="remote" src="https://example.com/a.png">'
    wide = '<div style="width:2000px">wide</div>'
    path = tmp_path / report.PAGE
    path.write_text(page.document("broken", "", [("x", "X", broken + remote + wide)]))
    out = headless(tmp_path / "log", "--dump-dom", "--virtual-time-budget=5000", path.as_uri())
    assert any("Content Security Policy" in line for line in console_lines(out.stderr)), out.stderr[-3000:]
    seen = in_browser(path, tmp_path)
    assert seen["decoded"] == [False, False] and seen["scroll"] > 400
    assert any("Content Security Policy" in str(error) for error in seen["errors"]), seen["errors"]
