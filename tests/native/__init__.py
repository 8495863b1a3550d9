"""Tests of the native room (see docs/ARCHITECTURE.md)."""
