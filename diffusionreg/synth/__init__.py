"""Paired synthetic data: a paired VQ-AE and an absorbing-diffusion transformer (Unleashing Registration)."""
