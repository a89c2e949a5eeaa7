"""Stage two: cheap classifiers on the cached vectors, their hyperparameter search and metrics."""
