"""Fake redi.synth (orchestration tests only)."""
