"""analysis: results -> tables -> figures (``python -m analysis.figures``). Nothing in varstudy
imports it; it reads the CSVs under ``results/`` and writes ``figures/``."""
