"""Test-wide set-up: import soco first so that its thread settings apply before torch starts."""

import soco  # noqa: F401
