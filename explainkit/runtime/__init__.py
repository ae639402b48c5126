"""What every layer may use: atomic file writes, image files, devices and torchrun process groups."""
