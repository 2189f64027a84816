"""Closed-loop evaluation of trained policies in simulators (ki.eval.metaworld)."""
