"""The KI ablation as a command: `python -m ki.ablation` trains the arms of an experiment file
(experiments/ki_ablation.py, loaded by path) and writes the table and plots (runner.py, report.py).
"""
