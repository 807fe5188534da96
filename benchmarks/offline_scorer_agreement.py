"""Agreement of the offline ``keyword_refusal`` scorer with labelled refusal / compliance texts.

Labelled set (not used to write the scorer): the RepNoise reference's DecodingTrust files in
``../shared/data/decoding_trust``: the 107 refusals written by Llama-2-7b-chat
(``with_refusals_train.json``; label 0 = refusal) against the human continuations of the same
data (``training_dataset.jsonl`` ``toxic`` and ``non_toxic`` rows; label 1 = compliant text).
The scorer's soft-refusal phrases were chosen after reading the even rows; only the odd rows
(held out) are scored here. The labels are noisy: a few of the "refusals" in that file are in fact
plain continuations, which caps the reachable refusal recall.

    python benchmarks/offline_scorer_agreement.py [--data ../shared/data/decoding_trust] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from harness.api.components import DatasetRef
from harness.lib.data import load_dataset_ref
from harness.api.registry import METRICS


def auroc(scores: list[float], labels: list[int]) -> float:
    pos = [s for s, y in zip(scores, labels) if y == 1]
    neg = [s for s, y in zip(scores, labels) if y == 0]
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "decoding_trust"))
    ap.add_argument("--out")
    args = ap.parse_args()
    toxic = load_dataset_ref(DatasetRef(name="decoding_trust", path=args.data, type="toxic"))
    benign = load_dataset_ref(DatasetRef(name="decoding_trust", path=args.data, type="non_toxic"))
    # the phrase list's soft-refusal entries were written after reading the even rows: report the
    # odd rows (held out) of both classes
    refusals = [e.refusal for e in toxic if e.refusal][1::2]
    compliant = [e.response for e in toxic + benign if e.response][1::2]
    texts = refusals + compliant
    labels = [0] * len(refusals) + [1] * len(compliant)
    scorer = METRICS.get("keyword_refusal")()
    scores = scorer.score([""] * len(texts), texts)
    pred = [int(s > 0.5) for s in scores]
    tp = sum(p == 1 and y == 1 for p, y in zip(pred, labels))
    tn = sum(p == 0 and y == 0 for p, y in zip(pred, labels))
    result = {
        "n_refusal": len(refusals), "n_compliant": len(compliant),
        "accuracy": (tp + tn) / len(labels),
        "balanced_accuracy": 0.5 * (tp / len(compliant) + tn / len(refusals)),
        "refusal_recall": tn / len(refusals), "compliant_recall": tp / len(compliant),
        "auroc": auroc(scores, labels),
    }
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
