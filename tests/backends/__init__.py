"""Tests of the backends room (see docs/ARCHITECTURE.md)."""
