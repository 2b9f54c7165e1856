"""Attention maps of one prompt: the exact weights of chosen layers and heads, their numbers, and a picture.

Why eager: SDPA and flash kernels never form the weights (nor does GPT-Neo's SDPA layer here,
finetune.models.neo_attention), so the model is switched to transformers' eager attention, whose softmax is what
`output_attentions=True` returns. Why hooks: only the requested layers are kept. A forward hook on each chosen
attention module copies its chosen heads' [T, T] maps as the forward passes; every other layer's weights are
dropped as the model drops them, and the LM head is skipped (no [T, vocab] logits), so memory is
layers x heads x T^2 beyond one layer's own, whatever the model's depth. The base is the same model with its adapter
disabled (peft's `disable_adapter()`), not a second copy.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass

from finetune.errors import ConfigError

MAX_DEFAULT = 8  # layers (an even sample) and heads (the first) drawn when none are chosen
MAX_LABELLED = 48  # token labels on the axes up to this many tokens
MAX_PIXELS = 16000  # the PNG's longer side at most (the dpi shrinks for big grids)


@dataclass
class Maps:
    """Captured attention, [layers, heads, T, T] float32 on the CPU: query rows, key columns, each row summing to 1."""

    layers: list[int]
    heads: list[int]
    kinds: list[str | None]  # per drawn layer: "global" | "local" (GPT-Neo); None: rotary families, no window
    window: int | None  # GPT-Neo's local window
    fine_tuned: object  # torch.Tensor
    base: object | None = None  # the same model with its adapter disabled (compare=true)

    @property
    def difference(self):
        return None if self.base is None else self.fine_tuned - self.base

    def title(self, row: int) -> str:
        """`L{i} global`, `L{i} local (window W)` (GPT-Neo) or `L{i}`."""
        kind = self.kinds[row]
        suffix = f" local (window {self.window})" if kind == "local" else f" {kind}" if kind else ""
        return f"L{self.layers[row]}{suffix}"


def layer_kinds(config) -> list[str | None]:
    """Per layer: GPT-Neo's "global" / "local" (config.attention_layers); None where attention has no window."""
    kinds = getattr(config, "attention_layers", None) if config.model_type == "gpt_neo" else None
    return list(kinds) if kinds else [None] * config.num_hidden_layers


def select(config, layers: list[str] | None, heads: list[str] | None) -> tuple[list[int], list[int]]:
    """The layers and heads to draw: the chosen ones (checked against the model, every problem at once), else the
    defaults: all layers up to 8, else an even sample of 8 with the first and last (and, for GPT-Neo, a global and a
    local layer); all heads up to 8, else the first 8."""
    n_layers, n_heads = config.num_hidden_layers, config.num_attention_heads
    chosen_layers, problems = (
        _indices("layers", layers, n_layers) if layers else (default_layers(layer_kinds(config)), [])
    )
    chosen_heads, more = _indices("heads", heads, n_heads) if heads else (list(range(min(n_heads, MAX_DEFAULT))), [])
    if problems + more:
        raise ConfigError(problems + more)
    return chosen_layers, chosen_heads


def _indices(key: str, values: list[str], count: int) -> tuple[list[int], list[str]]:
    """The indices given to `key=` (sorted, once each) and what is wrong with them."""
    chosen, problems = set(), []
    for value in values:
        try:
            index = int(value)
        except ValueError:
            problems.append(f"{key}={value}: not an index; give integers from 0 to {count - 1}")
            continue
        if 0 <= index < count:
            chosen.add(index)
        else:
            problems.append(f"{key}={index}: out of range; this model has {count} {key} (0 to {count - 1})")
    return sorted(chosen), problems


def default_layers(kinds: list[str | None]) -> list[int]:
    """All layers up to MAX_DEFAULT; else an even sample with the first and the last, where every kind of layer the
    model has (GPT-Neo: global and local) is present: a missing kind replaces the middle pick by its nearest layer."""
    n = len(kinds)
    if n <= MAX_DEFAULT:
        return list(range(n))
    chosen = sorted({round(k * (n - 1) / (MAX_DEFAULT - 1)) for k in range(MAX_DEFAULT)})
    for kind in sorted(set(kinds) - {kinds[i] for i in chosen}, key=str):
        middle = len(chosen) // 2
        chosen[middle] = min(
            (i for i, k in enumerate(kinds) if k == kind), key=lambda i, at=chosen[middle]: abs(i - at)
        )
    return sorted(chosen)


def check_fits(config, tokens: int, label: str) -> None:
    """The prompt alone (nothing is generated) fits in the model's context."""
    context = config.max_position_embeddings
    if not 0 < tokens <= context:
        raise ConfigError(
            f"prompt=: {tokens} tokens as rendered with {label}; the model's context holds 1 to {context} tokens: "
            "shorten the prompt"
        )


def attention_modules(model) -> list:
    """The self-attention module of each layer, in order (GPT-Neo, GPT-NeoX/Pythia, GPT-J; under peft too)."""
    from transformers.models.gpt_neo.modeling_gpt_neo import GPTNeoSelfAttention
    from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXAttention
    from transformers.models.gptj.modeling_gptj import GPTJAttention

    found = [m for m in model.modules() if isinstance(m, (GPTNeoSelfAttention, GPTNeoXAttention, GPTJAttention))]
    if not found:
        raise ConfigError(
            f"{type(model).__name__}: no GPT-Neo, GPT-NeoX or GPT-J attention layers: inspect reads those families"
        )
    return found


def use_eager(model) -> None:
    """Switch `model` (bare or under peft) to transformers' eager attention: the only path that forms the weights.
    GPT-Neo's switch is finetune.models.neo_attention's layer swap; the others' is transformers' own."""
    from finetune.models import neo_attention  # noqa: F401 - registers GPT-Neo's switch with transformers

    model = model.get_base_model() if hasattr(model, "get_base_model") else model
    model.set_attn_implementation("eager")


def capture(model, input_ids, layers: list[int], heads: list[int]):
    """The chosen heads' attention maps of the chosen layers for one sequence, [layers, heads, T, T] float32 on the
    CPU: each map copied out of its layer's forward by a hook (the model's eager weights themselves), the rest not
    kept. The LM head is not run."""
    import torch

    modules = attention_modules(model)
    captured = {}

    def keep(layer: int):
        def hook(module, args, output):
            if output[1] is None:
                raise RuntimeError(
                    f"layer {layer}: the attention returned no weights (attention implementation "
                    f"{module.config._attn_implementation!r}); call use_eager(model) first"
                )
            captured[layer] = output[1][0, heads].float().cpu()

        return hook

    handles = [modules[i].register_forward_hook(keep(i)) for i in layers]
    body = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        with torch.no_grad():
            body.base_model(input_ids=input_ids.to(body.device), use_cache=False)  # the decoder, without the LM head
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack([captured[i] for i in layers])


def compute(model, input_ids, config, layers: list[int], heads: list[int], compare: bool = False) -> Maps:
    """The maps of a loaded model (switched to eager here); compare=True adds the base's, the adapter disabled."""
    use_eager(model)
    kinds = layer_kinds(config)
    maps = Maps(
        layers,
        heads,
        [kinds[i] for i in layers],
        config.window_size if "local" in kinds else None,
        capture(model, input_ids, layers, heads),
    )
    if compare:
        if not hasattr(model, "disable_adapter"):
            raise ConfigError("compare=true: this model has no adapter to disable: there is no base to compare with")
        with model.disable_adapter():
            maps.base = capture(model, input_ids, layers, heads)
    return maps


def statistics(weights) -> tuple[list[list[float]], list[list[float]]]:
    """Per layer and head of [layers, heads, T, T] maps: the mean attention distance, sum_j a_ij * (i - j) averaged
    over queries i (how far back a head looks, in tokens), and the mean row entropy in nats (how spread out it is)."""
    import torch

    t = weights.shape[-1]
    offsets = (torch.arange(t)[:, None] - torch.arange(t)[None, :]).float()
    distance, entropy = [], []
    for layer in weights:  # one layer at a time: the products are [heads, T, T]
        distance.append((layer * offsets).sum(-1).mean(-1).tolist())
        entropy.append((-torch.special.xlogy(layer, layer)).sum(-1).mean(-1).tolist())
    return distance, entropy


def summary(maps: Maps) -> list[dict]:
    """attention.json's numbers: per drawn layer, per head and their mean over heads, fine-tuned (and base)."""
    models = {"fine_tuned": statistics(maps.fine_tuned)}
    if maps.base is not None:
        models["base"] = statistics(maps.base)
    rows = []
    for row, layer in enumerate(maps.layers):
        entry = {"layer": layer, "title": maps.title(row), "kind": maps.kinds[row]}
        for name, (distance, entropy) in models.items():
            per_head = [
                {"head": head, "mean_distance": d, "entropy": e}
                for head, d, e in zip(maps.heads, distance[row], entropy[row])
            ]
            entry[name] = {
                "mean_distance": sum(distance[row]) / len(maps.heads),
                "entropy": sum(entropy[row]) / len(maps.heads),
                "heads": per_head,
            }
        rows.append(entry)
    return rows


def token_labels(pieces: list[str]) -> list[str]:
    """Each token's text as a short readable label: escapes shown (\\n), `$` kept out of matplotlib's math mode."""
    return [repr(piece)[1:-1][:12].replace("$", r"\$") for piece in pieces]


def draw(maps: Maps, labels: list[str], path, heading: str) -> None:
    """The PNG: one grid of layers x heads (query rows, key columns); with a base, three side by side: base,
    fine-tuned and fine-tuned - base (diverging, centred at 0). Local layers show their window's edge."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import Normalize, PowerNorm
    from matplotlib.figure import Figure

    t = maps.fine_tuned.shape[-1]
    labelled = t <= MAX_LABELLED
    weights = PowerNorm(0.5, vmin=0.0, vmax=1.0)  # small weights stay visible beside a strong diagonal
    panels = [("fine-tuned", maps.fine_tuned, weights, "viridis")]
    if maps.base is not None:
        difference = maps.difference
        limit = max(float(difference.abs().max()), 1e-12)
        panels = [
            ("base", maps.base, weights, "viridis"),
            panels[0],
            (f"fine-tuned - base (max |difference| {limit:.2e})", difference, Normalize(-limit, limit), "RdBu_r"),
        ]
    cell = max(2.6, 0.09 * t + 1.0) if labelled else 2.6
    width = len(panels) * (len(maps.heads) * cell + 1.2)
    heading = textwrap.fill(heading.replace("$", r"\$"), max(40, int(width * 9)))  # ~9 characters an inch at 11 pt
    header, footer = 0.8 + 0.2 * heading.count("\n"), 0.9 if labelled else 0.5  # inches: titles, tick labels
    height = len(maps.layers) * cell + header + footer
    figure = Figure(figsize=(width, height))
    FigureCanvasAgg(figure)
    figure.suptitle(heading, y=1 - 0.1 / height, va="top", fontsize=11)
    for subfigure, (name, values, norm, cmap) in zip(figure.subfigures(1, len(panels), squeeze=False)[0], panels):
        subfigure.suptitle(name, y=1 - (header - 0.45) / height, va="top", fontsize=10)
        axes = subfigure.subplots(
            len(maps.layers),
            len(maps.heads),
            squeeze=False,
            gridspec_kw={"top": 1 - header / height, "bottom": footer / height, "left": 0.08, "right": 0.88},
        )
        for row in range(len(maps.layers)):
            for col, head in enumerate(maps.heads):
                image = _cell(axes[row][col], maps, row, values[row, col].numpy(), norm, cmap)
                axes[row][col].set_title(f"{maps.title(row)} H{head}", fontsize=7)
                _ticks(axes[row][col], labels if labelled else None, col == 0, row == len(maps.layers) - 1)
        subfigure.colorbar(image, ax=axes, shrink=0.5, fraction=0.04)
    figure.savefig(path, format="png", dpi=min(100, MAX_PIXELS / max(width, height)))


def _cell(ax, maps: Maps, row: int, values, norm, cmap):
    """One map, with the local window's edge (the border before key = query - window + 1) where the window cuts."""
    image = ax.imshow(values, norm=norm, cmap=cmap)
    t, window = values.shape[-1], maps.window
    if maps.kinds[row] == "local" and t > window:
        ax.plot([-0.5, t - window], [window - 1, t - 0.5], color="red", linestyle="--", linewidth=0.8)
        ax.set_xlim(-0.5, t - 0.5)
        ax.set_ylim(t - 0.5, -0.5)
    return image


def _ticks(ax, labels: list[str] | None, left: bool, bottom: bool) -> None:
    """Token labels (or positions, for long prompts) on the grid's outer edges only."""
    if labels is not None:
        blank = [""] * len(labels)
        ax.set_xticks(range(len(labels)), labels if bottom else blank, rotation=90, fontsize=4)
        ax.set_yticks(range(len(labels)), labels if left else blank, fontsize=4)
    else:
        ax.tick_params(labelsize=5, labelbottom=bottom, labelleft=left)
    if bottom:
        ax.set_xlabel("key", fontsize=6)
    if left:
        ax.set_ylabel("query", fontsize=6)
