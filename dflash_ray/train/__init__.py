"""Training: the tiny demo target and DFlash drafters."""
