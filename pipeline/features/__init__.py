"""Stage one: backbones, engines and the extraction of one feature vector per image into the cache."""
