"""Automatic interpretation: LLM explanations of dictionary features, scored by detection and fuzzing."""
