"""fluxir-jax: FluxGen + FluxIR real-world image restoration on FLUX.1 in JAX/Flax."""
__version__ = "0.1.0"
