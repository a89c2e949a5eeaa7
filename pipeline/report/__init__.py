"""Reports: the comparison of models and the audit page."""
