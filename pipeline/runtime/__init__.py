"""Errors and exit codes, devices, settings, files and torchrun processes: what every step uses."""
