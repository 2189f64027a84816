"""Tokenizers: FAST action tokens (fast.py), where they sit in the LM vocabulary (fast_mapping.py),
and the SentencePiece text side with the pi0.5 prompt (prompt.py)."""
