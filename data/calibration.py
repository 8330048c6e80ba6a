"""Deterministic JSON key-value retrieval samples for threshold calibration (as in the SALE paper).

Seeds are namespaced ("sale-calibration/<seed>"), so no sample can coincide with evaluation data or with the
passkey prompts, which use their own namespaces.
"""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import Callable

INSTRUCTION = "Extract the value corresponding to the specified key in the JSON object below."
NAMESPACE = "sale-calibration"


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _render(pairs: list[tuple[str, str]], key: str) -> str:
    body = json.dumps(dict(pairs), indent=1)
    return f"{INSTRUCTION}\n\nJSON data:\n{body}\n\nKey: \"{key}\"\nCorresponding value:"


def kv_retrieval_sample(seed: int, target_tokens: int, count_tokens: Callable[[str], int],
                        key_position: float = 0.05) -> tuple[str, str]:
    """(prompt, expected value) with as many pairs as fit in ``target_tokens`` by ``count_tokens``.

    The queried key sits at ``key_position`` (fraction of the pairs, default near the start of the context).
    """
    if target_tokens < 64:
        raise ValueError(f"target_tokens must be >= 64, got {target_tokens}")
    rng = random.Random(f"{NAMESPACE}/{seed}")
    per_pair = max(1, count_tokens(_render([(_uuid(rng), _uuid(rng)) for _ in range(8)], "x")) // 8)
    pairs = [(_uuid(rng), _uuid(rng)) for _ in range(target_tokens // per_pair + 8)]
    lo, hi = 1, len(pairs)  # largest prefix of pairs whose prompt fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count_tokens(_render(pairs[:mid], pairs[0][0])) <= target_tokens:
            lo = mid
        else:
            hi = mid - 1
    chosen = pairs[:lo]
    key, value = chosen[min(len(chosen) - 1, int(key_position * len(chosen)))]
    return _render(chosen, key), value
