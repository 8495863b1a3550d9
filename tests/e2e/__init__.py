"""Tests of the e2e room (see docs/ARCHITECTURE.md)."""
