"""fluxir-jax: FluxGen + FluxIR real-world image restoration on FLUX.1 in JAX/Flax."""
from fluxir_jax.libtpu_env import default_libtpu_flags as _default_libtpu_flags
from fluxir_jax.libtpu_env import quiet_libtpu_without_tpu as _quiet_libtpu_without_tpu

_quiet_libtpu_without_tpu()  # before JAX starts: libtpu's start-up warnings on machines without TPU chips
_default_libtpu_flags()  # before libtpu starts: FSDP matmuls without windowed einsums (libtpu_env.LIBTPU_FLAGS)

__version__ = "0.1.0"
