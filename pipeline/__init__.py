"""Transfer learning on images as a two-stage feature-cache pipeline."""
__version__ = "0.1.0"
