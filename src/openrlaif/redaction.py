"""Masking a secret (an API key) in text that came from elsewhere, before it reaches a message.

Servers echo keys in error bodies, often partly masked ("Incorrect API key provided:
sk-TESTS*****T123"): replacing only the whole key would leave most of it readable. So every run
of 4 or more characters that is a piece of the key is masked, whole, as `***`.
"""

from __future__ import annotations

MASK = "***"
MIN_PIECE = 4  # shorter runs are too common in ordinary text to say anything about the key


def redact(text: str, secret: str | None) -> str:
    """`text` with the secret and every piece of it of MIN_PIECE+ characters replaced by MASK
    (adjacent pieces merge into one MASK). A secret shorter than MIN_PIECE is masked where it
    occurs whole."""
    if not secret or not text:
        return text
    if len(secret) < MIN_PIECE:
        return text.replace(secret, MASK)
    pieces = {secret[i : i + MIN_PIECE] for i in range(len(secret) - MIN_PIECE + 1)}
    # Every piece of the key of MIN_PIECE+ characters is covered by its MIN_PIECE-character windows.
    covered = [False] * len(text)
    for i in range(len(text) - MIN_PIECE + 1):
        if text[i : i + MIN_PIECE] in pieces:
            covered[i : i + MIN_PIECE] = [True] * MIN_PIECE
    if not any(covered):
        return text
    out: list[str] = []
    for i, char in enumerate(text):
        if not covered[i]:
            out.append(char)
        elif i == 0 or not covered[i - 1]:
            out.append(MASK)
    return "".join(out)
