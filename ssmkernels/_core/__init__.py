"""Shared machinery: configuration, dispatch, validation, tolerances, custom ops, native loading."""
