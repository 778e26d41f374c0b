"""What `python -m iblip_jax.main` runs. settings.py reads the config once into checked settings; cli.py is the
command line around the modes (flags, start-up before JAX, exit statuses); one module per mode (train, evaluate,
predict, export, summary); common.py what they share; restore.py the model for inference; logger.py and
workdir_lock.py the run's logs and its ownership of the workdir."""
