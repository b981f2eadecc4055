"""The toy suite's coding checker: a toy-Lisp interpreter (`run_program`) and `check_program`, registered as
the `toy_lisp` checker of ptm.eval's `program` scorer by `register()`.

Registration is explicit: whoever scores toy-suite items calls `register()` (the experiment runner, the merge
search, `ptm eval`); importing this module or ptm.eval registers nothing.
"""

from __future__ import annotations

import re

CHECKER = "toy_lisp"  # name of the ptm.eval `program` checker that `register()` adds


class ProgramError(ValueError):
    """A toy-Lisp program that does not parse or run (model output, so not a PtmError)."""


_LISP_OPS = {"add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b}
_LISP_TOKEN = re.compile(r"\s*(\(|\)|-?\d+|[a-z]+)")


def run_program(src: str) -> int:
    """Evaluate a toy-Lisp expression: INT | (add|sub|mul EXPR EXPR). No Python is ever eval'd."""
    if len(src) > 200:
        raise ProgramError("program longer than 200 characters")
    tokens, pos, src = [], 0, src.strip()
    while pos < len(src):
        m = _LISP_TOKEN.match(src, pos)
        if not m:
            raise ProgramError(f"unexpected text at {pos}: {src[pos:pos + 10]!r}")
        tokens.append(m.group(1))
        pos = m.end()

    def expr(i: int, depth: int) -> tuple[int, int]:
        if depth > 16:
            raise ProgramError("nesting deeper than 16")
        if i >= len(tokens):
            raise ProgramError("unexpected end of program")
        tok = tokens[i]
        if re.fullmatch(r"-?\d+", tok):
            return int(tok), i + 1
        if tok != "(" or i + 1 >= len(tokens) or tokens[i + 1] not in _LISP_OPS:
            raise ProgramError(f"expected a number or (add|sub|mul ...), got {tok!r}")
        a, j = expr(i + 2, depth + 1)
        b, j = expr(j, depth + 1)
        if j >= len(tokens) or tokens[j] != ")":
            raise ProgramError("expected ')'")
        return _LISP_OPS[tokens[i + 1]](a, b), j + 1

    value, end = expr(0, 0)
    if end != len(tokens):
        raise ProgramError(f"trailing text after the expression: {' '.join(tokens[end:])!r}")
    return value


def check_program(output: str, reference: str | list[str], meta: dict | None = None) -> bool:
    """The output (first non-empty line) is a toy-Lisp program whose value equals the reference integer."""
    lines = [ln for ln in output.strip().splitlines() if ln.strip()]
    try:
        value = run_program(lines[0]) if lines else None
    except ProgramError:
        return False
    refs = [reference] if isinstance(reference, str) else reference
    return value is not None and any(str(value) == r.strip() for r in refs)



def register() -> None:
    """Register `check_program` as the `toy_lisp` checker of ptm.eval's `program` scorer (idempotent)."""
    from ptm.eval.scorers import register_checker

    register_checker(CHECKER)(check_program)
