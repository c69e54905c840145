"""idmp_jax: I Dream My Painting (WACV 2025) in JAX/Flax."""
__version__ = "0.1.0"
