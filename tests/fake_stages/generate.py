"""Fake redi.generate (orchestration tests only)."""
