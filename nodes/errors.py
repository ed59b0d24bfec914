"""Errors for bad node inputs: one message that names the input and says what was expected."""
from __future__ import annotations


class InputError(ValueError):
    """Raised before any heavy work when a node input is unusable."""

    def __init__(self, input_name: str, expected: str, got: object = None, hint: str | None = None):
        msg = f"Personalize: input '{input_name}': expected {expected}"
        if got is not None:
            msg += f", got {got}"
        if hint:
            msg += f". {hint}"
        super().__init__(msg)
        self.input_name = input_name


def require(cond: bool, input_name: str, expected: str, got: object = None, hint: str | None = None) -> None:
    if not cond:
        raise InputError(input_name, expected, got, hint)
