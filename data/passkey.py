"""Passkey retrieval prompts (plain completion form) for the demo's accuracy check."""

from __future__ import annotations

import random
import re
from collections.abc import Callable

NAMESPACE = "sale-passkey"
INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the important information there.\n")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
QUESTION = "\nWhat is the pass key? The pass key is"


def _render(repeats: int, depth: float, key: str) -> str:
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    parts = [FILLER] * repeats
    parts.insert(round(depth * repeats), needle)
    return INTRO + "".join(parts) + QUESTION


def passkey_prompt(seed: int, target_tokens: int, count_tokens: Callable[[str], int]) -> tuple[str, str]:
    """(prompt, 5-digit key) of at most ``target_tokens`` tokens, the needle at a seeded depth in [0.1, 0.9]."""
    rng = random.Random(f"{NAMESPACE}/{seed}")
    key = str(rng.randint(10000, 99999))
    depth = rng.uniform(0.1, 0.9)
    lo, hi = 0, max(1, target_tokens // 4)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count_tokens(_render(mid, depth, key)) <= target_tokens:
            lo = mid
        else:
            hi = mid - 1
    return _render(lo, depth, key), key


def found_key(generated: str, key: str) -> bool:
    """True when the first number in the generated text is the key."""
    match = re.search(r"\d+", generated)
    return bool(match) and match.group() == key
