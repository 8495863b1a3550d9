"""Tests of the core room (see docs/ARCHITECTURE.md)."""
