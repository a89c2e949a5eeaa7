"""How images become batches of tensors: decoding, preprocessing and batching, on the CPU and on the GPU."""
