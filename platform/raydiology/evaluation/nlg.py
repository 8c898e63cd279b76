"""Natural-language generation metrics for reports: BLEU-1..4, METEOR, ROUGE-L, CIDEr.

Computed by pycocoevalcap, the implementation every report-generation paper quotes, so the
numbers compare. Two choices change the numbers and are therefore explicit and recorded:

- `ptb`: COCO's evaluation first runs the Stanford PTB tokenizer (lower case, punctuation
  split off and dropped). R2Gen, R2GenGPT and MambaXray-VL skip it and score their own cleaned
  text (lower case, " ." separated) as is. Default off, like them.
- METEOR runs Java (`meteor-1.5.jar`); one JVM is started per evaluation and scores every
  report through its stdin protocol, because starting one per report costs seconds each.

Without the PTB tokenizer, whitespace runs (newlines included) become single spaces: METEOR
reads one line per report, and ROUGE-L splits on single spaces.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence

METRICS = ("BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "METEOR", "ROUGE_L", "CIDEr")


def _ptb_tokenize(texts: Sequence[str]) -> list[str]:
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenized = PTBTokenizer().tokenize({i: [{"caption": t}] for i, t in enumerate(texts)})
    return [tokenized[i][0] for i in range(len(texts))]


def nlg_scores(
    references: Sequence[str], predictions: Sequence[str], *, ptb: bool = False
) -> dict[str, float]:
    """Corpus-level BLEU-1..4, METEOR, ROUGE-L and CIDEr of predictions against references.

    One reference per prediction. CIDEr's document frequencies come from these references,
    so it is a property of the whole set (as in pycocoevalcap), not a mean of per-report
    scores.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge

    if len(references) != len(predictions):
        raise ValueError(f"{len(references)} references but {len(predictions)} predictions")
    if not references:
        raise ValueError("no reports to score")
    if shutil.which("java") is None:
        raise RuntimeError("METEOR and the PTB tokenizer need Java on PATH (java not found)")
    if ptb:
        refs, preds = _ptb_tokenize(references), _ptb_tokenize(predictions)
    else:
        refs = [" ".join(t.split()) for t in references]
        preds = [" ".join(t.split()) for t in predictions]
    gts = {i: [r] for i, r in enumerate(refs)}
    res = {i: [p] for i, p in enumerate(preds)}

    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    scores = {f"BLEU_{n + 1}": float(b) for n, b in enumerate(bleu)}
    meteor = Meteor()  # one JVM for the whole evaluation
    try:
        scores["METEOR"] = float(meteor.compute_score(gts, res)[0])
    finally:
        _close_meteor(meteor)
    scores["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
    scores["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    return scores


def _close_meteor(meteor: object) -> None:
    """End the METEOR JVM now rather than whenever the object is garbage collected."""
    process = getattr(meteor, "meteor_p", None)
    if process is not None and process.poll() is None:
        process.stdin.close()
        process.kill()
        process.wait()
