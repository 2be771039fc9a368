"""End-to-end demos behind ``python -m ssmkernels demo <name>``.

- ``phonebook``: phonebook recall (issue 9): the hybrid, pure Mamba-2 and two Transformers of
  matched size trained on the same synthetic look-up task, evaluated at 1x, 2x and 4x the
  training context.

Each demo module exposes ``main(argv: list[str]) -> int``. Nothing here is imported by the
public API.
"""

DEMOS = ("phonebook",)
