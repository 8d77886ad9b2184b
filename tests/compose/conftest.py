"""The compose stack as a session fixture for the tests in this folder (see compose_stack.py)."""

from tests.compose.compose_stack import stack  # noqa: F401
