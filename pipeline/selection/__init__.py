"""Which unlabelled images of the cache's pool to label next."""
