"""Dataset building for idmp_jax: the original README's steps as one CLI, `python -m data_prep <step>`."""
