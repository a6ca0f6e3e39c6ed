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


class _FakeCupy:
    """What DependentLaunch asks CuPy for: the current device and stream."""

    def __init__(self, device):
        cuda = type("cuda", (), {})()
        cuda.runtime = type("runtime", (), {"getDevice": staticmethod(lambda: self.device)})()
        cuda.get_current_stream = lambda: type("stream", (), {"ptr": 0})()
        self.cuda, self.device = cuda, device


def _fake_array(device, ptr=0x1000):
    return type("array", (), {"data": type("data", (), {"ptr": ptr})(), "device": type("dev", (), {"id": device})()})()


def test_a_call_checks_its_device_and_names_the_drivers_error(monkeypatch):
    """The launch was built for one GPU: a call with another device current, or an output on another one,
    is refused with the remedy (CuPy checks this for its own launches); a failed cuLaunchKernelEx names
    the CUresult."""
    fake = _FakeCupy(device=0)
    launched = []

    def launch_kernel_ex(config, function, params, extra):
        launched.append((config._obj.gridDimX, config._obj.hStream))
        return fake.result

    fake.result = 0
    monkeypatch.setattr(pdl, "_cupy", lambda: fake)
    monkeypatch.setattr(pdl, "_launch_kernel_ex", lambda: launch_kernel_ex)
    function = type("fn", (), {"kernel": type("k", (), {"ptr": 0xF00})()})()
    launch = pdl.DependentLaunch(function, 7, 256, (_fake_array(0), np.int64(5)), device=0)
    launch(_fake_array(0, 0x2000))
    assert launched == [(7, None)] and launch._slots[-1].value == 0x2000
    with pytest.raises(ValueError, match=r"built on GPU 0.*output is on 1.*cupy\.cuda\.Device\(0\)"):
        launch(_fake_array(1))
    fake.device = 1                                                    # another device current
    with pytest.raises(ValueError, match=r"current device is 1"):
        launch(_fake_array(0))
    assert len(launched) == 1                                          # neither refused call reached the driver
    fake.device, fake.result = 0, 400
    with pytest.raises(RuntimeError, match=r"cuLaunchKernelEx failed with .*400"):
        launch(_fake_array(0))
    assert pdl.DependentLaunch(function, 1, 32, (), device=None)._device == 0   # default: the current device


def test_the_driver_is_looked_up_once_for_both_functions(monkeypatch):
    """The first library of DRIVER_LIBRARIES that loads gives cuLaunchKernelEx and cuGetErrorName; one without
    cuLaunchKernelEx (a pre-12.0 driver) is named with the remedy."""
    class Fn:                                                          # a ctypes function: argtypes, restype set
        def __call__(self, err, out):
            out._obj.value = b"CUDA_ERROR_INVALID_HANDLE"
            return 0

    loaded = []

    def cdll(name):
        loaded.append(name)
        if name == "libcuda.so.1":
            raise OSError(name)
        return type("lib", (), {"cuLaunchKernelEx": Fn(), "cuGetErrorName": Fn()})()

    for f in (pdl._driver, pdl._launch_kernel_ex, pdl._driver_error_name):
        f.cache_clear()
    monkeypatch.setattr(pdl.ctypes, "CDLL", cdll)
    try:
        launch = pdl._launch_kernel_ex()
        assert launch.restype is ctypes.c_int and len(launch.argtypes) == 4
        assert pdl.error_name(400) == "CUDA_ERROR_INVALID_HANDLE (400)"
        assert loaded == ["libcuda.so.1", "libcuda.so"]                # tried in order, loaded once for both
        monkeypatch.setattr(pdl.ctypes, "CDLL", lambda name: type("old", (), {})())
        for f in (pdl._driver, pdl._launch_kernel_ex, pdl._driver_error_name):
            f.cache_clear()
        with pytest.raises(OSError, match=r"libcuda\.so\.1 has no cuLaunchKernelEx.*PDL=0"):
            pdl._launch_kernel_ex()
        assert pdl.error_name(7) == "CUresult 7"                       # no cuGetErrorName: the number
    finally:
        for f in (pdl._driver, pdl._launch_kernel_ex, pdl._driver_error_name):
            f.cache_clear()
