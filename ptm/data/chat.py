"""Tulu 2 chat template with an exact assistant-only loss mask.

    <|system|>\\n{content}\\n  <|user|>\\n{content}\\n  <|assistant|>\\n{content}{EOS}\\n

BOS (if the tokenizer has one) comes first. The text is encoded in chunks that alternate between "prompt
text" (everything that is not assistant content: markers, system/user turns, the newline after EOS) and
"assistant content"; EOS is appended as an id. The mask is 1 on assistant content and its EOS, so it is exact
by construction, and `encode_prompt` reuses the same chunks, so a prompt is exactly the prefix training saw
before a reply.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ptm.data.tokenizers import Tokenizer
from ptm.errors import DataError

ROLES = ("system", "user", "assistant")


def _marker(role: str) -> str:
    return f"<|{role}|>\n"


def _chunks(messages: Sequence[dict], where: str) -> list[tuple[str, bool]]:
    """Split a conversation into (text, is_assistant_content) chunks; adjacent prompt text is merged."""
    out: list[tuple[str, bool]] = []
    pending = ""
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise DataError(f"{where}: message {i} must be a dict with 'role' and 'content', got {m!r:.60}")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise DataError(f"{where}: message {i} has role {role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise DataError(f"{where}: message {i} content must be a string, got {type(content).__name__}")
        if role == "assistant":
            out.append((pending + _marker(role), False))
            out.append((content, True))
            pending = "\n"  # the newline after EOS belongs to the next prompt chunk
        else:
            pending += _marker(role) + content + "\n"
    if pending:
        out.append((pending, False))
    return out


def encode_chat(messages: Sequence[dict], tokenizer: Tokenizer, *, where: str = "<messages>"
                ) -> tuple[np.ndarray, np.ndarray]:
    """Token ids (int32) and loss mask (uint8: 1 on assistant content and the EOS after it)."""
    ids: list[int] = []
    mask: list[int] = []
    if tokenizer.bos_id is not None:
        ids.append(tokenizer.bos_id)
        mask.append(0)
    for text, is_reply in _chunks(messages, where):
        toks = tokenizer.encode(text) if text else []
        ids.extend(toks)
        mask.extend([int(is_reply)] * len(toks))
        if is_reply:
            ids.append(tokenizer.eos_id)
            mask.append(1)
    return np.asarray(ids, np.int32), np.asarray(mask, np.uint8)


def encode_prompt(messages: Sequence[dict], tokenizer: Tokenizer, *, where: str = "<messages>") -> list[int]:
    """Ids for generation: every turn, then `<|assistant|>\\n`; the training prefix before that reply."""
    msgs = list(messages) + [{"role": "assistant", "content": ""}]
    # Drop the appended empty reply and the "\n" chunk after it; what remains ends with the assistant marker.
    chunks = _chunks(msgs, where)[:-2]
    ids: list[int] = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    for text, is_reply in chunks:
        ids.extend(tokenizer.encode(text) if text else [])
        if is_reply:
            ids.append(tokenizer.eos_id)
    return ids
