"""Tests of the passes room (see docs/ARCHITECTURE.md)."""
