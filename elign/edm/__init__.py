"""EDM domain: equivariant diffusion over atoms (EGNN) on QM9, as a Gaussian policy for FED-GRPO."""
