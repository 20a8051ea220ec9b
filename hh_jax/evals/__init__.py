"""Evaluations, one evaluator a file: PM accuracy and calibration (pm_accuracy), the √KL
and scaling fits (fits), and the paper's HHH, multiple-choice, OOD and Elo evaluations."""
