"""A pytest plugin / import hook: jax >= 0.11's Pallas Triton lowering asks the local GPU for its compute
capability; on a machine without one this makes it lower for an H100 instead, so the kernels' CUDA lowering
(tests/test_decode_layer.py, tests/test_triton_lowering.py) and bench/layer_sass.py can be checked under the
jax the GPU image runs (0.11, Python >= 3.12) on a CPU machine:

    python3.12 -m venv /tmp/v312 && /tmp/v312/bin/pip install jax==0.11.2 flax orbax-checkpoint pytest triton
    JAX_PLATFORMS=cpu PYTHONPATH=bench /tmp/v312/bin/python -m pytest -p pretend_h100 tests/test_decode_layer.py

jax 0.10 (CI) lowers without a GPU already and does not need it. Internals of jax: for checking only.
"""
import jax._src.pallas.triton.gpu_info as _gi
import jax._src.pallas.triton.pallas_call_registration as _reg

_INFO = _gi.get_gpu_info_from_version(_gi.GpuVersion.H100)
_reg.gpu_info_lib.get_gpu_info = lambda: _INFO
