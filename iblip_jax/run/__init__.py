"""What `python -m iblip_jax.main` runs: one module per mode, plus what they share."""
