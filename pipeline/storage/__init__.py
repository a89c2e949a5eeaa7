"""What is written to disk: the HDF5 feature cache and the files of a model directory."""
