"""Text metrics for generated answers, from the libraries the field reports with (no hand-written copies).

- exact match and token F1: the official SQuAD normalisation (lower case, no punctuation or articles), as
  implemented by torchmetrics (`torchmetrics.functional.text.squad`);
- ROUGE-L F-measure: Google's `rouge_score` (the implementation behind the published ROUGE numbers), with stemming;
- BLEU: `sacrebleu`'s corpus BLEU (standard 13a tokenisation), 0-100 as sacrebleu reports it.

EM, F1 and ROUGE-L are means over rows in 0..1; BLEU is one corpus score.
"""

from __future__ import annotations

METRIC_NAMES = ("exact_match", "token_f1", "rougeL", "bleu")


def text_metrics(predictions: list[str], references: list[str]) -> dict[str, float]:
    """The four metrics of `predictions` against one reference each (same order)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        return {}
    em, f1 = _squad(predictions, references)
    return {
        "exact_match": em,
        "token_f1": f1,
        "rougeL": _rouge_l(predictions, references),
        "bleu": _bleu(predictions, references),
    }


def _squad(predictions: list[str], references: list[str]) -> tuple[float, float]:
    from torchmetrics.functional.text import squad

    preds = [{"prediction_text": p, "id": str(i)} for i, p in enumerate(predictions)]
    target = [{"answers": {"answer_start": [0], "text": [r]}, "id": str(i)} for i, r in enumerate(references)]
    scores = squad(preds, target)
    return float(scores["exact_match"]) / 100, float(scores["f1"]) / 100


def _rouge_l(predictions: list[str], references: list[str]) -> float:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return sum(scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)) / len(predictions)


def _bleu(predictions: list[str], references: list[str]) -> float:
    import sacrebleu

    return float(sacrebleu.corpus_bleu(predictions, [references]).score)
