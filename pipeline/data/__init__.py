"""Finding labelled images, assigning splits, reading and decoding image files."""
