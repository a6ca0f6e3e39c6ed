"""The ctypes structures of minipeft.kernels.pdl against cuda.h's layout (CPU: no GPU needed)."""
from __future__ import annotations

import ctypes

import numpy as np
import pytest

from minipeft.kernels import pdl


def test_launch_structures_have_cuda_h_layout():
    # CUlaunchAttribute: the 4-byte id, padding to 8, a 64-byte value union
    assert ctypes.sizeof(pdl._AttributeValue) == 64
    assert pdl._Attribute.value.offset == 8 and ctypes.sizeof(pdl._Attribute) == 72
    # CUlaunchConfig: seven unsigned ints, padding, the stream, the attributes' pointer, their number
    assert pdl._Config.hStream.offset == 32 and pdl._Config.attrs.offset == 40
    assert pdl._Config.numAttrs.offset == 48 and ctypes.sizeof(pdl._Config) == 56
    assert pdl.PROGRAMMATIC_STREAM_SERIALIZATION == 6


def test_slots_take_the_kernels_argument_types():
    assert pdl._slot(np.int64(1 << 40)).value == 1 << 40
    assert isinstance(pdl._slot(np.int32(-3)), ctypes.c_int32) and pdl._slot(np.int32(-3)).value == -3
    with pytest.raises(TypeError, match="np.int64 and np.int32"):
        pdl._slot(3)                                                   # a Python int: its width is unknown


def test_a_missing_driver_is_named_with_the_remedy():
    """Without the CUDA driver (this CPU machine), asking for cuLaunchKernelEx names the libraries tried
    and the way out (PDL=0)."""
    for name in pdl.DRIVER_LIBRARIES:
        try:
            ctypes.CDLL(name)
        except OSError:
            continue
        pytest.skip(f"{name} is present: a driver is installed")
    pdl._launch_kernel_ex.cache_clear()
    with pytest.raises(OSError, match=r"libcuda\.so\.1.*PDL=0"):
        pdl._launch_kernel_ex()
