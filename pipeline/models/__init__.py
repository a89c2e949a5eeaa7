"""Using a trained model directory: predict, export, visualize."""
