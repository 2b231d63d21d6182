"""Training/serving skew: the training distribution saved with a model (stats.py), the
served-feature log binned the same way (served.py), PSI (psi.py), the report and its
command line (`python -m features.skew`)."""
