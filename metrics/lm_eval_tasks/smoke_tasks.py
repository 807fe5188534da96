"""Rows of the bundled offline capability task ``smoke_arith`` (made here, deterministic)."""

import random

import datasets


def smoke_arith_rows(n: int = 60, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(10, 49), rng.randint(10, 49)
        right = a + b
        wrong = rng.sample([right + d for d in (-11, -10, -2, -1, 1, 2, 10, 11)], 3)
        choices = [str(x) for x in wrong + [right]]
        rng.shuffle(choices)
        rows.append({"a": a, "b": b, "choices": choices, "label": choices.index(str(right))})
    return rows


def load_smoke_arith(**_: object) -> datasets.DatasetDict:
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(smoke_arith_rows())})
