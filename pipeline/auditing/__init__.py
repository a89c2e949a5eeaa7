"""What the cache knows about the dataset: label issues, near-duplicates and leaks, outliers, a learning curve."""
