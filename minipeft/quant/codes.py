"""Quantization codes: the lookup tables that 4-bit and 8-bit indices point into.

A *code* (bitsandbytes calls it a *map*) is a sorted float32 table of representable
values in [-1, 1]; block-wise quantization divides a block by its absolute maximum and
stores, for every element, the index of the nearest code value.

- **NF4** (QLoRA, Dettmers et al. 2023, arXiv 2305.14314, Sec. 3 "4-bit NormalFloat"):
  quantiles of N(0, 1) normalised to [-1, 1], with an exact zero; built here exactly as
  bitsandbytes' ``create_normal_map(offset=0.9677083, use_extra_value=True)`` does, and
  also shipped as the 16 literals bitsandbytes hard-codes (a test checks they agree).
- **FP4**: bitsandbytes' own sign-magnitude 4-bit float (bit 3 = sign), *not* OCP E2M1.
- **Int4**: the uniform grid ``k/7`` of ``get_4bit_type("int4")``, for comparison.
- **Dynamic maps** (dynamic tree quantization, Dettmers 2015, arXiv 1511.04561; used by
  8-bit block-wise quantization, arXiv 2110.02861): 8-bit tables with a dynamic exponent,
  signed for signed data (and the nested absmax of double quantization), unsigned for
  Adam's second moment.

:func:`nearest_code_index`, :func:`nf4_index` and :func:`fp4_index` map scaled values to
indices with bitsandbytes' tie rules (vectorized ``searchsorted``, NumPy or CuPy); the
4-bit ones use the float32 thresholds the CUDA kernels compare against.

The float32 arithmetic matters: bitsandbytes builds its tables with PyTorch's float32
``linspace``; :func:`linspace_f32` reproduces that kernel, so the constructions below
match the shipped literals bit for bit. Tables here are NumPy constants; quantizers
move them to the data's device with ``xp.asarray``.
"""
from __future__ import annotations

import numpy as np

from ..backend import to_numpy, xp_of

_F32 = np.float32


def _frozen(values, dtype=np.float32) -> np.ndarray:
    """A read-only array, so a shared table cannot be changed by accident."""
    arr = np.asarray(values, dtype=dtype)
    arr.flags.writeable = False
    return arr


# ---------------------------------------------------------------------------------------
# NF4: the 16 literals of bitsandbytes' get_4bit_type("nf4") (index = 4-bit code).
# 7 negative values, one exact zero (index 7), 8 positive values; sorted.
NF4 = _frozen([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
])
# The CUDA quantizer dQuantizeNF4 compares x against 15 float literals (strict >, so a
# value on a threshold goes to the lower index). The literals are the float64 midpoints
# of neighbouring NF4 values, printed to 16-17 digits with an ``f`` suffix; the compiler
# rounds each *decimal* literal once to float32. Four of the float64 midpoints sit exactly
# half-way between two float32 numbers, so the printed decimal lies just above or below
# that tie and picks a side: at indices 0, 8, 12 and 14 the thresholds are 1 ulp from the
# float32 midpoints ``(c[i] + c[i+1]) / 2`` (and from ``np.float32(float(literal))``,
# which rounds twice). Checked against bitsandbytes 0.50.2: the float32 midpoints 0, 12
# and 14 are quantized to the *upper* index there.
NF4_THRESHOLDS = _frozen([
    -0.84809643, -0.6106329, -0.45999527, -0.33967942, -0.2346074, -0.13791174,
    -0.045525018, 0.03979015, 0.120255254, 0.20352125, 0.29201376, 0.38931254,
    0.5016634, 0.6427869, 0.8614784,
])

# FP4: bitsandbytes' table is [0, 0.0625, 8, 12, 4, 6, 2, 3, -0, ...] / 12 (float32). Its
# "-0" is a Python int, so entry 8 is +0.0 in the tensor bitsandbytes returns (checked
# against the fixture made by bitsandbytes 0.50.2).
# Index bits: s e1 e0 m; low 3 bits select the magnitude, bit 3 the sign.
_FP4_TIMES_12 = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0,
                 0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)
FP4 = _frozen(np.asarray(_FP4_TIMES_12, _F32) / _F32(12))
FP4_MAGNITUDE = _frozen(FP4[:8])
# The CUDA quantizer dQuantizeFP4 compares |x| against these float32 literals (strict >);
# three of them sit 1-14 ulp off the true midpoints, so use them, not computed midpoints.
FP4_THRESHOLDS = _frozen([0.00260417, 0.0859375, 0.20833333, 0.29166667,
                          0.4166667, 0.583333, 0.8333333])
# rank r = #{t : |x| > t} -> low 3 bits of the index (magnitudes in increasing order).
FP4_RANK_TO_CODE = _frozen([0b000, 0b001, 0b110, 0b111, 0b100, 0b101, 0b010, 0b011],
                           dtype=np.uint8)

# Int4 as bitsandbytes' get_4bit_type("int4"): [7, 6, ..., 0, -0, -1, ..., -7] / 7.
# Not sorted and holds both +0 and -0; the block-wise quantizer handles any order.
INT4 = _frozen(np.asarray([7, 6, 5, 4, 3, 2, 1, 0, -0.0, -1, -2, -3, -4, -5, -6, -7],
                          _F32) / _F32(7))

# ---------------------------------------------------------------------------------------
# The two 8-bit dynamic maps exactly as PyTorch-built bitsandbytes holds them
# (sha256[:16] of the little-endian float32 bytes: e732639a65f497b4 / 305f002cc11278fb).

_DYNAMIC_SIGNED_LITERALS = (
    -0.99296874, -0.9789063, -0.96484375, -0.9507812, -0.93671876, -0.92265624, -0.9085938, -0.89453125,  # 0-7
    -0.8804687, -0.86640626, -0.85234374, -0.8382813, -0.82421875, -0.8101562, -0.79609376, -0.78203124,  # 8-15
    -0.7679688, -0.75390625, -0.7398437, -0.72578126, -0.7117188, -0.6976563, -0.68359375, -0.6695312,  # 16-23
    -0.65546876, -0.6414063, -0.6273438, -0.61328125, -0.5992187, -0.58515626, -0.5710938, -0.5570313,  # 24-31
    -0.54296875, -0.5289062, -0.5148437, -0.50078124, -0.4867187, -0.47265625, -0.45859373, -0.44453126,  # 32-39
    -0.43046874, -0.41640624, -0.40234375, -0.38828123, -0.37421876, -0.36015624, -0.34609374, -0.33203125,  # 40-47
    -0.31796873, -0.30390626, -0.28984374, -0.27578127, -0.26171875, -0.24765624, -0.23359375, -0.21953125,  # 48-55
    -0.20546874, -0.19140625, -0.17734376, -0.16328125, -0.14921875, -0.13515624, -0.12109375, -0.107031256,  # 56-63
    -0.09859375, -0.09578126, -0.092968754, -0.09015625, -0.08734375, -0.08453125, -0.08171876, -0.07890625,  # 64-71
    -0.07609375, -0.07328125, -0.070468746, -0.067656256, -0.06484375, -0.06203125, -0.059218753, -0.05640625,  # 72-79
    -0.05359375, -0.05078125, -0.04796875, -0.04515625, -0.042343747, -0.03953125, -0.036718752, -0.03390625,  # 80-87
    -0.03109375, -0.028281251, -0.02546875, -0.02265625, -0.019843752, -0.01703125, -0.01421875, -0.01140625,  # 88-95
    -0.00971875, -0.009156249, -0.00859375, -0.00803125, -0.00746875, -0.00690625, -0.00634375, -0.00578125,  # 96-103
    -0.0052187503, -0.0046562497, -0.00409375, -0.0035312497, -0.00296875, -0.00240625, -0.00184375, -0.0012812499,  # 104-111
    -0.0009437501, -0.00083125, -0.00071875006, -0.0006062501, -0.00049375003, -0.00038125002, -0.00026875004, -0.00015625001,  # 112-119
    -8.875e-05, -6.625e-05, -4.375e-05, -2.1249998e-05, -7.75e-06, -3.2500002e-06, -5.5000004e-07, 0.0,  # 120-127
    5.5000004e-07, 3.2500002e-06, 7.75e-06, 2.1249998e-05, 4.375e-05, 6.625e-05, 8.875e-05, 0.00015625001,  # 128-135
    0.00026875004, 0.00038125002, 0.00049375003, 0.0006062501, 0.00071875006, 0.00083125, 0.0009437501, 0.0012812499,  # 136-143
    0.00184375, 0.00240625, 0.00296875, 0.0035312497, 0.00409375, 0.0046562497, 0.0052187503, 0.00578125,  # 144-151
    0.00634375, 0.00690625, 0.00746875, 0.00803125, 0.00859375, 0.009156249, 0.00971875, 0.01140625,  # 152-159
    0.01421875, 0.01703125, 0.019843752, 0.02265625, 0.02546875, 0.028281251, 0.03109375, 0.03390625,  # 160-167
    0.036718752, 0.03953125, 0.042343747, 0.04515625, 0.04796875, 0.05078125, 0.05359375, 0.05640625,  # 168-175
    0.059218753, 0.06203125, 0.06484375, 0.067656256, 0.070468746, 0.07328125, 0.07609375, 0.07890625,  # 176-183
    0.08171876, 0.08453125, 0.08734375, 0.09015625, 0.092968754, 0.09578126, 0.09859375, 0.107031256,  # 184-191
    0.12109375, 0.13515624, 0.14921875, 0.16328125, 0.17734376, 0.19140625, 0.20546874, 0.21953125,  # 192-199
    0.23359375, 0.24765624, 0.26171875, 0.27578127, 0.28984374, 0.30390626, 0.31796873, 0.33203125,  # 200-207
    0.34609374, 0.36015624, 0.37421876, 0.38828123, 0.40234375, 0.41640624, 0.43046874, 0.44453126,  # 208-215
    0.45859373, 0.47265625, 0.4867187, 0.50078124, 0.5148437, 0.5289062, 0.54296875, 0.5570313,  # 216-223
    0.5710938, 0.58515626, 0.5992187, 0.61328125, 0.6273438, 0.6414063, 0.65546876, 0.6695312,  # 224-231
    0.68359375, 0.6976563, 0.7117188, 0.72578126, 0.7398437, 0.75390625, 0.7679688, 0.78203124,  # 232-239
    0.79609376, 0.8101562, 0.82421875, 0.8382813, 0.85234374, 0.86640626, 0.8804687, 0.89453125,  # 240-247
    0.9085938, 0.92265624, 0.93671876, 0.9507812, 0.96484375, 0.9789063, 0.99296874, 1.0,  # 248-255
)

_DYNAMIC_UNSIGNED_LITERALS = (
    0.0, 3.2500003e-07, 7.75e-07, 2.1249998e-06, 4.3749997e-06, 6.625e-06, 8.874999e-06, 1.5624999e-05,  # 0-7
    2.6875001e-05, 3.8125e-05, 4.9374998e-05, 6.0625003e-05, 7.1875e-05, 8.312499e-05, 9.4375e-05, 0.000128125,  # 8-15
    0.000184375, 0.00024062501, 0.00029687502, 0.00035312498, 0.00040937503, 0.00046562502, 0.00052187504, 0.000578125,  # 16-23
    0.000634375, 0.00069062505, 0.000746875, 0.0008031251, 0.00085937505, 0.000915625, 0.00097187504, 0.001140625,  # 24-31
    0.001421875, 0.001703125, 0.001984375, 0.002265625, 0.0025468748, 0.002828125, 0.0031093748, 0.0033906251,  # 32-39
    0.003671875, 0.003953125, 0.0042343745, 0.004515625, 0.0047968747, 0.005078125, 0.005359375, 0.0056406246,  # 40-47
    0.005921875, 0.0062031248, 0.006484375, 0.0067656254, 0.0070468746, 0.007328125, 0.0076093744, 0.007890625,  # 48-55
    0.008171875, 0.008453124, 0.008734375, 0.009015624, 0.0092968745, 0.009578126, 0.009859375, 0.010703126,  # 56-63
    0.012109376, 0.013515624, 0.014921876, 0.016328124, 0.017734377, 0.019140625, 0.020546874, 0.021953126,  # 64-71
    0.023359375, 0.024765624, 0.026171876, 0.027578129, 0.028984373, 0.030390626, 0.031796873, 0.033203125,  # 72-79
    0.034609374, 0.036015626, 0.03742188, 0.038828123, 0.040234376, 0.041640624, 0.043046873, 0.044453125,  # 80-87
    0.045859374, 0.047265626, 0.04867187, 0.050078124, 0.051484372, 0.052890625, 0.054296877, 0.05570313,  # 88-95
    0.057109382, 0.058515627, 0.059921872, 0.061328124, 0.06273438, 0.06414063, 0.06554688, 0.06695312,  # 96-103
    0.068359375, 0.06976563, 0.07117188, 0.072578125, 0.07398438, 0.07539063, 0.07679688, 0.07820313,  # 104-111
    0.07960938, 0.081015624, 0.08242188, 0.08382813, 0.085234374, 0.086640626, 0.08804687, 0.08945312,  # 112-119
    0.090859376, 0.09226563, 0.09367188, 0.095078126, 0.09648438, 0.09789063, 0.099296875, 0.103515625,  # 120-127
    0.11054687, 0.11757813, 0.12460937, 0.13164061, 0.13867188, 0.14570314, 0.15273437, 0.15976563,  # 128-135
    0.16679686, 0.17382812, 0.18085939, 0.18789062, 0.19492188, 0.20195311, 0.20898438, 0.21601564,  # 136-143
    0.22304687, 0.23007813, 0.23710936, 0.24414062, 0.25117186, 0.25820312, 0.26523438, 0.2722656,  # 144-151
    0.27929688, 0.28632814, 0.29335937, 0.3003906, 0.30742186, 0.31445312, 0.3214844, 0.32851562,  # 152-159
    0.33554685, 0.3425781, 0.34960938, 0.35664064, 0.36367187, 0.3707031, 0.37773436, 0.38476562,  # 160-167
    0.3917969, 0.39882812, 0.40585935, 0.4128906, 0.41992188, 0.42695314, 0.43398437, 0.4410156,  # 168-175
    0.44804686, 0.45507812, 0.4621094, 0.46914062, 0.47617185, 0.4832031, 0.49023438, 0.4972656,  # 176-183
    0.5042969, 0.5113281, 0.51835936, 0.5253906, 0.5324218, 0.53945315, 0.54648435, 0.5535157,  # 184-191
    0.5605469, 0.56757814, 0.5746094, 0.5816406, 0.5886719, 0.5957031, 0.6027344, 0.60976565,  # 192-199
    0.61679685, 0.6238282, 0.6308594, 0.63789064, 0.6449219, 0.6519531, 0.6589844, 0.6660156,  # 200-207
    0.6730469, 0.68007815, 0.68710935, 0.6941407, 0.7011719, 0.70820314, 0.7152344, 0.7222656,  # 208-215
    0.7292969, 0.7363281, 0.7433594, 0.75039065, 0.75742185, 0.7644532, 0.7714844, 0.7785156,  # 216-223
    0.7855469, 0.7925781, 0.7996094, 0.8066406, 0.8136718, 0.82070315, 0.82773435, 0.8347657,  # 224-231
    0.8417969, 0.8488281, 0.8558594, 0.8628906, 0.8699219, 0.8769531, 0.8839843, 0.89101565,  # 232-239
    0.89804685, 0.9050782, 0.9121094, 0.9191406, 0.9261719, 0.9332031, 0.9402344, 0.9472656,  # 240-247
    0.9542968, 0.96132815, 0.96835935, 0.9753907, 0.9824219, 0.9894531, 0.9964844, 1.0,  # 248-255
)

DYNAMIC_SIGNED = _frozen(_DYNAMIC_SIGNED_LITERALS)      # index 127 = 0.0, 255 = 1.0; no -1
DYNAMIC_UNSIGNED = _frozen(_DYNAMIC_UNSIGNED_LITERALS)  # index 0 = 0.0, 255 = 1.0


# ---------------------------------------------------------------------------------------
# Constructions
def linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """``torch.linspace(start, end, steps)`` in float32, as PyTorch's CPU kernel computes it.

    ``step = (end - start) / (steps - 1)`` in float32; the first half is
    ``fma(step, i, start)``, the second half ``fma(-step, steps - 1 - i, end)``, each
    rounded once to float32. (``numpy.linspace`` differs in the last bit for some entries,
    which is enough to change the dynamic maps and one NF4 value.) The fma is exact in
    float64 here: ``step * i`` has at most 24 + 9 significant bits.
    """
    if steps < 2:
        raise ValueError(f"linspace_f32 needs steps >= 2, got {steps}")
    start32, end32 = _F32(start), _F32(end)
    step = _F32((end32 - start32) / _F32(steps - 1))
    i = np.arange(steps, dtype=np.float64)
    low = (np.float64(step) * i + np.float64(start32)).astype(_F32)
    high = (np.float64(end32) - np.float64(step) * (steps - 1 - i)).astype(_F32)
    return np.where(i < steps // 2, low, high).astype(_F32)


def create_normal_map(offset: float = 0.9677083, use_extra_value: bool = True) -> np.ndarray:
    """The 256-entry NormalFloat table of bitsandbytes (QLoRA, Sec. 3).

    Positive half: ``ppf`` of 8 probabilities evenly spaced (float32 linspace) from
    ``offset`` down to 0.5 (the 0.5 itself dropped); negative half: minus the ``ppf`` of 7
    such probabilities; 241 zeros fill the table to 256 entries. Cast to float32, sort,
    divide by the maximum ``ppf(offset)`` in float32. With ``use_extra_value=False`` the
    table is symmetric (7 + 7 values and zero).

    Note: this is *not* the paper's formula q_i = (Q(i/(2^k+1)) + Q((i+1)/(2^k+1)))/2;
    it is what the library computes, and :data:`NF4` is its slice ``[:8] + [-8:]``.
    """
    from scipy.stats import norm  # here, not at the top: importing scipy.stats takes ~0.8 s

    n_pos = 9 if use_extra_value else 8
    v_pos = norm.ppf(linspace_f32(offset, 0.5, n_pos)[:-1].astype(np.float64))  # 8 or 7
    v_neg = -norm.ppf(linspace_f32(offset, 0.5, 8)[:-1].astype(np.float64))     # 7
    zeros = np.zeros(256 - len(v_pos) - len(v_neg))
    values = np.sort(np.concatenate([v_pos, zeros, v_neg]).astype(_F32))
    return (values / values.max()).astype(_F32)                                  # (256,)


def nf4_from_normal_map(normal_map: np.ndarray | None = None) -> np.ndarray:
    """The 16 NF4 values: the non-zero ends of :func:`create_normal_map` plus one zero."""
    code = create_normal_map() if normal_map is None else np.asarray(normal_map, _F32)
    return np.concatenate([code[:8], code[-8:]]).astype(_F32)


def create_dynamic_map(signed: bool = True, max_exponent_bits: int = 7,
                       total_bits: int = 8) -> np.ndarray:
    """bitsandbytes' dynamic (tree) quantization map, 256 float32 values, sorted.

    For each decade i = 0 .. max_exponent_bits-1 (scale 10**(i - max_exponent_bits + 1)):
    take ``linspace_f32(0.1, 1, n_i)`` with n_i = 2**i + 1 (signed) or 2**(i+1) + 1
    (unsigned), the float32 midpoints of consecutive entries, multiplied by the decade
    scale cast to float32; the signed map adds the negated values. Then 0 and 1.0 are
    appended, the table padded with zeros to 256 and sorted. The result equals the
    shipped :data:`DYNAMIC_SIGNED` / :data:`DYNAMIC_UNSIGNED` bit for bit.
    """
    non_sign_bits = total_bits - 1            # bitsandbytes uses total_bits - 1 for both kinds
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    data: list[np.ndarray] = []

    def decade(i: int, n_items: int) -> None:
        bounds = linspace_f32(0.1, 1.0, n_items)
        means = (bounds[:-1] + bounds[1:]) / _F32(2)
        scale = _F32(10.0 ** (-(max_exponent_bits - 1) + i))
        data.append(scale * means)
        if signed:
            data.append(-(scale * means))

    for i in range(max_exponent_bits):
        shift = i + non_sign_bits - max_exponent_bits + (0 if signed else 1)
        decade(i, 2 ** shift + 1)
    if additional_items > 0:
        decade(max_exponent_bits - 1, additional_items + 1)
    values = np.concatenate(data + [np.asarray([0.0, 1.0], _F32)]).astype(_F32)
    if values.size != 2 ** total_bits:
        raise ValueError(f"dynamic map has {values.size} values, expected 2**{total_bits}")
    values = np.concatenate([values, np.zeros(256 - values.size, _F32)])
    return np.sort(values).astype(_F32)


def get_4bit_type(name: str) -> np.ndarray:
    """A writable copy of the 16-entry table ``'nf4'``, ``'fp4'`` or ``'int4'``."""
    tables = {"nf4": NF4, "fp4": FP4, "int4": INT4}
    if name not in tables:
        raise ValueError(f"unknown 4-bit type {name!r}: expected one of {sorted(tables)}")
    return tables[name].copy()


# ---------------------------------------------------------------------------------------
# Error bounds
def midpoints(code: np.ndarray) -> np.ndarray:
    """Float32 midpoints ``(c[i] + c[i+1]) / 2`` of the sorted distinct code values."""
    values = np.unique(np.asarray(code, _F32))               # sorted, +0/-0 merged
    return ((values[:-1] + values[1:]) / _F32(2)).astype(_F32)


def worst_case_error(code: np.ndarray) -> float:
    """Largest |x - nearest code value| for x in [-1, 1], as a fraction of the block absmax.

    Inside the table it is half the widest gap between neighbours; at the ends the whole
    gap to +-1 counts when the table stops short of it (the signed dynamic map has no -1:
    -absmax comes back as -0.99296874 * absmax). NF4: 0.1519036 (between -1 and
    -0.6961928); FP4: 1/6 (between 2/3 and 1); Int4: 1/14; dynamic signed: 0.0070313;
    dynamic unsigned (for x in [0, 1], since it has no negative values): 0.0035157.
    """
    values = np.unique(np.asarray(code, np.float64))
    gaps = np.diff(values) / 2.0
    low = -1.0 if values[0] < 0 else 0.0      # an unsigned code is meant for x in [0, 1]
    ends = [values[0] - low, 1.0 - values[-1]]
    return float(max(gaps.max(initial=0.0), *ends))


# ---------------------------------------------------------------------------------------
# Nearest code (vectorized; NumPy or CuPy arrays)
def nearest_code_index(scaled, code, tie: str = "lower"):
    """Index of the nearest ``code`` value for every element of ``scaled`` (vectorized).

    ``searchsorted`` over the float32 midpoints of the sorted distinct code values with
    ``side='left'``: a value exactly on a midpoint goes to the lower neighbour
    (``tie='lower'``, NF4's CUDA tree), or to the neighbour with the even index
    (``tie='even'``, the 8-bit CUDA binary search). Codes that are not sorted (Int4) or hold
    duplicates are searched through their sorted distinct values and mapped back to the
    first index holding each value.
    """
    if tie not in ("lower", "even"):
        raise ValueError(f"tie must be 'lower' or 'even', got {tie!r}")
    host = to_numpy(code).astype(_F32).ravel()
    if host.size < 2 or not np.isfinite(host).all():
        raise ValueError("code must hold at least two finite values")
    values, first_index = np.unique(host, return_index=True)          # sorted, +0/-0 merged
    mids_host = ((values[:-1] + values[1:]) / _F32(2)).astype(_F32)
    xp = xp_of(scaled)
    mids = xp.asarray(mids_host)
    pos = xp.searchsorted(mids, scaled, side="left")
    if tie == "even":
        on_mid = (pos < mids.size) & (scaled == mids[xp.minimum(pos, mids.size - 1)])
        pos = pos + (on_mid & (pos % 2 == 1))
    return xp.asarray(first_index.astype(np.int64))[pos]


def nf4_index(scaled):
    """bitsandbytes' NF4 index of each scaled value (its CUDA ``dQuantizeNF4`` tree).

    The number of :data:`NF4_THRESHOLDS` strictly below x: a value on a threshold goes to
    the lower index. NaN (an all-zero block's 0 * inf) is handled by the caller.
    """
    xp = xp_of(scaled)
    return xp.searchsorted(xp.asarray(NF4_THRESHOLDS), scaled, side="left")


def fp4_index(scaled):
    """bitsandbytes' FP4 index of each scaled value (its CUDA ``dQuantizeFP4``).

    Sign bit 8 when x < 0 (a tiny negative that rounds to zero is stored as 0b1000, -0;
    -0.0 itself is not < 0 and is stored as 0b0000); the low 3 bits from the rank of |x|
    among the literal thresholds (strict >), so ties go to the smaller magnitude.
    """
    xp = xp_of(scaled)
    sign = xp.where(scaled < 0, 8, 0).astype(xp.uint8)
    rank = xp.searchsorted(xp.asarray(FP4_THRESHOLDS), xp.abs(scaled), side="left")
    return xp.asarray(FP4_RANK_TO_CODE)[rank] | sign


CODES = {"nf4": NF4, "fp4": FP4, "int4": INT4,
         "dynamic": DYNAMIC_SIGNED, "udynamic": DYNAMIC_UNSIGNED}
