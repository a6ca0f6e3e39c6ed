"""Quantization from first principles, agreeing with bitsandbytes bit for bit.

codes      NF4 / FP4 / Int4 tables and the 8-bit dynamic maps, with their error bounds
absmax     absmax (symmetric) and zero-point (asymmetric) int8 quantization
floats     float32 -> bfloat16 / float16 from the bit patterns; range and precision
blockwise  block-wise 8-bit and 4-bit quantization, double quantization, QuantState
int8       vector-wise int8, int8 matmul with int32 accumulation, LLM.int8() decomposition
"""
from .absmax import absmax_dequantize, absmax_quantize, zeropoint_dequantize, zeropoint_quantize
from .blockwise import (QuantState, bits_per_parameter, dequantize_4bit, dequantize_blockwise,
                        double_dequantize, double_quantize, quantize_4bit, quantize_blockwise,
                        quantize_fp4, quantize_nf4, unpack_4bit)
from .codes import (DYNAMIC_SIGNED, DYNAMIC_UNSIGNED, FP4, INT4, NF4, create_dynamic_map,
                    NF4_THRESHOLDS, create_normal_map, fp4_index, get_4bit_type, linspace_f32,
                    midpoints, nearest_code_index, nf4_from_normal_map, nf4_index,
                    worst_case_error)
from .floats import (BFLOAT16, FLOAT16, FLOAT32, FloatFormat, bfloat16_bits_to_float32,
                     float16_bits_to_float32, float32_to_bfloat16_bits, float32_to_float16_bits,
                     flush_subnormals, round_to_bfloat16, round_to_float16)
from .int8 import (MM_DEQUANT_CONST, int8_linear_matmul, int8_mm_dequant,
                   int8_vectorwise_dequant, int8_vectorwise_quant, llm_int8_matmul, matmul_8bit,
                   outlier_columns)

__all__ = [
    # absmax
    "absmax_quantize", "absmax_dequantize", "zeropoint_quantize", "zeropoint_dequantize",
    # blockwise
    "QuantState", "quantize_blockwise", "dequantize_blockwise", "quantize_4bit",
    "dequantize_4bit", "quantize_nf4", "quantize_fp4", "double_quantize", "double_dequantize",
    "unpack_4bit", "bits_per_parameter",
    # codes
    "NF4", "FP4", "INT4", "DYNAMIC_SIGNED", "DYNAMIC_UNSIGNED", "create_normal_map",
    "nf4_from_normal_map", "create_dynamic_map", "get_4bit_type", "linspace_f32", "midpoints",
    "worst_case_error", "nearest_code_index", "fp4_index", "nf4_index", "NF4_THRESHOLDS",
    # floats
    "FloatFormat", "FLOAT32", "FLOAT16", "BFLOAT16", "float32_to_bfloat16_bits",
    "bfloat16_bits_to_float32", "float32_to_float16_bits", "float16_bits_to_float32",
    "round_to_bfloat16", "round_to_float16", "flush_subnormals",
    # int8
    "MM_DEQUANT_CONST", "int8_vectorwise_quant", "int8_vectorwise_dequant",
    "int8_linear_matmul", "int8_mm_dequant", "matmul_8bit", "llm_int8_matmul",
    "outlier_columns",
]
