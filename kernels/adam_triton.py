"""Single-pass fused Adam/AdamW step in Triton, one launch for many tensors.

Each program takes one chunk (CHUNK consecutive elements of one tensor), finds its tensor in the
launch's table (adam_gpu/backends/tensor_table.py) by binary search, loads param, grad, exp_avg,
exp_avg_sq (and max_exp_avg_sq) BLOCK elements at a time, does the whole step in fp32 and stores param
and moments back in their storage dtypes. A whole chunk of a tensor whose addresses are all 16-byte
aligned takes the vector path (16 bytes a thread per access for fp32); any other chunk the scalar path.
Hyper-parameters are runtime arguments (a scheduled lr never recompiles); only storage types and structural
options are compile-time constants.
"""

import triton
import triton.language as tl

from adam_gpu.kernel_abi import ROW_WIDTH as _ROW_WIDTH
from adam_gpu.kernel_abi import Column, DeviceScalar, Master, WeightDecay
from adam_gpu.storage_formats import EIGHT_BIT_MOMENTS

# The launch ABI (adam_gpu/kernel_abi.py) as constexprs: the table's columns, the device scalars, the modes.
PARAM_COLUMN: tl.constexpr = tl.constexpr(Column.PARAM.value)
GRAD_COLUMN: tl.constexpr = tl.constexpr(Column.GRAD.value)
EXP_AVG_COLUMN: tl.constexpr = tl.constexpr(Column.EXP_AVG.value)
EXP_AVG_SQ_COLUMN: tl.constexpr = tl.constexpr(Column.EXP_AVG_SQ.value)
MAX_EXP_AVG_SQ_COLUMN: tl.constexpr = tl.constexpr(Column.MAX_EXP_AVG_SQ.value)
STEP_COLUMN: tl.constexpr = tl.constexpr(Column.STEP.value)
MASTER_COLUMN: tl.constexpr = tl.constexpr(Column.MASTER.value)
EXP_AVG_ABSMAX_COLUMN: tl.constexpr = tl.constexpr(Column.EXP_AVG_ABSMAX.value)
EXP_AVG_SQ_ABSMAX_COLUMN: tl.constexpr = tl.constexpr(Column.EXP_AVG_SQ_ABSMAX.value)
ROW_WIDTH: tl.constexpr = tl.constexpr(_ROW_WIDTH)
LR: tl.constexpr = tl.constexpr(DeviceScalar.LR.value)
GRAD_MULTIPLIER: tl.constexpr = tl.constexpr(DeviceScalar.GRAD_MULTIPLIER.value)
FOUND_INF: tl.constexpr = tl.constexpr(DeviceScalar.FOUND_INF.value)
NO_WEIGHT_DECAY: tl.constexpr = tl.constexpr(WeightDecay.NO_WEIGHT_DECAY.value)
L2: tl.constexpr = tl.constexpr(WeightDecay.L2.value)
DECOUPLED: tl.constexpr = tl.constexpr(WeightDecay.DECOUPLED.value)
NO_MASTER: tl.constexpr = tl.constexpr(Master.NO_MASTER.value)
FP32_MASTER: tl.constexpr = tl.constexpr(Master.FP32_MASTER.value)
LEAN_MASTER: tl.constexpr = tl.constexpr(Master.LEAN_MASTER.value)
# 8-bit moments (QUANTIZED): uint8 codes of a 256-entry map, one fp32 absmax per QUANT_BLOCK elements
# (adam_gpu/storage_formats.py describes the format, adam_gpu/quantization.py specifies its codes). BLOCK and CHUNK
# are multiples of it.
QUANT_BLOCK: tl.constexpr = tl.constexpr(EIGHT_BIT_MOMENTS.scale.block)

# Elements a program updates per iteration (with NUM_WARPS) and per chunk: `adam-gpu tune`'s best (docs/benchmarks.md).
BLOCK = 1024
CHUNK = 2048
# BLOCK with 8-bit moments (with QUANTIZED_NUM_WARPS), a multiple of QUANT_BLOCK: the same sweep (docs/benchmarks.md).
QUANTIZED_BLOCK = 512
# The interpreter's BLOCK and CHUNK: a program costs it the same at any size (docs/testing.md, "Triton on the CPU").
INTERPRETER_BLOCK = 16384
INTERPRETER_CHUNK = 65536
# Contract a * b + c into FMAs (one rounding instead of two). Triton 3.10 turns fusion off by default,
# so the choice is stated at every launch.
FP_FUSION = True
# Divisions and square roots are IEEE round-to-nearest (tl.div_rn, tl.sqrt_rn), as torch's: on NVIDIA GPUs `/` lowers
# to div.full.f32 and tl.sqrt to sqrt.approx.ftz.f32, which the CPU interpreter hides (tests/test_aot_compile.py).


@triton.jit
def _store_rounded(ptr, offsets, value, mask):
    """Store fp32 ``value`` into ``ptr``'s element type, rounding to nearest even.

    bf16 is rounded on the bit pattern: Triton's CPU interpreter truncates fp32 -> bf16 casts while
    the GPU rounds, so the explicit rounding keeps both identical (and identical to torch).
    """
    if ptr.dtype.element_ty == tl.bfloat16:
        bits = value.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        quiet_nan = (bits >> 16) | 0x40
        bf16_bits = tl.where(value != value, quiet_nan, rounded).to(tl.uint16)
        tl.store(ptr + offsets, bf16_bits.to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(ptr + offsets, value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _lerp(start, end, weight):
    """``start + weight * (end - start)`` formed from the nearer end, as torch.lerp does: weight 1 (beta 0)
    gives ``end`` exactly, and a bf16 moment then rounds as torch's. (The textbook ``beta * m + (1 - beta) *
    g`` drifts further in fp32: see StepScalars in adam_gpu/hyperparameters.py.)"""
    # end - (1 - weight) * (end - start) = end + (weight - 1) * (end - start): one FMA from the nearer end.
    # (weight - 1 is exact for weight >= 0.5.)
    from_start = weight < 0.5
    return tl.where(from_start, start, end) + tl.where(from_start, weight, weight - 1.0) * (end - start)


@triton.jit
def _one_minus_exp(x):
    """``1 - exp(x) = -expm1(x)`` for ``x <= 0`` to fp32 accuracy (Triton has no expm1 on every target, nor in
    its interpreter): 1 - exp(x) cancels near 0, so for x > -1/2 the Taylor series of -expm1 to x**12
    (truncation < 1e-13 relative), else 1 - exp(x) (>= 0.39). Worst error over -1e-12..-10, in numpy
    fp32: 1.2e-7 relative (1 - exp(x) alone: 6.7e-4 at x = -1e-5, beta2 = 0.99999 at step 1)."""
    series = 1.0 + x * (1.0 / 12.0)  # (reciprocals of constants: the same fp32 products on GPU and CPU)
    for k in tl.static_range(11, 1, -1):
        series = 1.0 + x * (1.0 / k) * series
    return tl.where(x > -0.5, -x * series, 1.0 - tl.exp(x))


@triton.jit
def _load_lean_master(param_ptr, remainder_ptr, offsets, mask):
    """fp32 from the bf16 param's bits (the high half) plus the signed 16-bit remainder (the rest)."""
    high = tl.load(param_ptr + offsets, mask=mask).to(tl.uint16, bitcast=True).to(tl.uint32) << 16
    low = tl.load(remainder_ptr + offsets, mask=mask).to(tl.int32).to(tl.uint32, bitcast=True)
    return (high + low).to(tl.float32, bitcast=True)


@triton.jit
def _store_lean_master(param_ptr, remainder_ptr, offsets, value, mask):
    """The bf16 param rounded half-up on the bits, and the remainder that restores ``value`` exactly.

    Half-up (not to even) keeps the remainder in [-0x8000, 0x7FFF], which int16 holds; the param is
    still within half an ulp of the master. NaN stays NaN (its payload may change)."""
    bits = value.to(tl.uint32, bitcast=True)
    param_bits = tl.where(value != value, (bits >> 16) | 0x40, (bits + 0x8000) >> 16)
    remainder = (bits - (param_bits << 16)) & 0xFFFF
    tl.store(param_ptr + offsets, param_bits.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
    tl.store(remainder_ptr + offsets, remainder.to(tl.uint16).to(tl.int16, bitcast=True), mask=mask)


@triton.jit
def _magnitude_value(magnitude_code, SIGNED: tl.constexpr):
    """m[k], the map's non-negative value of magnitude code ``k`` (int32), bit for bit the fp32 map's entry.

    The maps are small float formats divided by their largest value, 1.875 (a sign, 4 exponent and 3 mantissa bits
    for exp_avg; 5 and 3 for exp_avg_sq; adam_gpu/quantization.py). A magnitude code shifted into fp32's exponent
    and mantissa fields is the format's value times 2^(bias - 127), subnormals included; times 2^64 it is a normal
    fp32, exactly. The division by 1.875 (times the powers of two) is then a product by its rounded reciprocal and
    one FMA correction, which rounds as the division would: the map's bits for all 256 codes of both maps (checked
    in tests/test_quantization.py), where the product alone differs for 96 of them."""
    if SIGNED:  # exponent bias 15
        reciprocal = 150119995408384.0  # 2^48 / 1.875, rounded to fp32: 2^(127 - 64 - 15) / 1.875
        divisor = 6.661338147750939e-15  # 1.875 * 2^-48, exact
    else:  # exponent bias 31
        reciprocal = 2290649344.0  # 2^32 / 1.875, rounded to fp32: 2^(127 - 64 - 31) / 1.875
        divisor = 4.3655745685100555e-10  # 1.875 * 2^-32, exact
    scaled = (magnitude_code << 20).to(tl.float32, bitcast=True) * 18446744073709551616.0  # 2^64
    quotient = scaled * reciprocal
    return tl.fma(tl.fma(-quotient, divisor, scaled), reciprocal, quotient)


@triton.jit
def _code_value(code, SIGNED: tl.constexpr):
    """The map entry of ``code`` (uint8) from its bits, no map read: entries 128 + k of the signed map hold +m[k]
    and 127 - k hold -m[k]; the unsigned map's entry k is m[k]."""
    code = code.to(tl.uint32)
    if SIGNED:
        # 127 - code below 128 and code - 128 from it are code ^ 0x7F and code ^ 0x80; the sign bit is ~code's top
        # bit, set rather than negated: entry 127 is -0.0.
        value = _magnitude_value(code ^ (0x7F + (code >> 7)), SIGNED)
        sign = ((~code >> 7) & 1) << 31
        return (value.to(tl.uint32, bitcast=True) | sign).to(tl.float32, bitcast=True)
    return _magnitude_value(code, SIGNED)


@triton.jit
def _nearest_code(value, SIGNED: tl.constexpr):
    """Index of the map entry nearest to ``value`` (the lower one on a tie), no map read.

    The bits of |value| * 1.875 (the format's own scale) give the magnitude code k of the last entry <= |value|, off
    by one only within a few ulps of an entry, where the nearer of m[k] and m[k + 1] is that entry anyway. The
    distances are those of the map's own rule, (upper - value) < (value - lower), on magnitudes: rounding to nearest
    is symmetric, so for a negative value the same two distances decide, and a tie goes to the larger magnitude
    (the lower code). The rule on the map's own pairs gave the same code as a binary search of the map for every
    fp32 value in [-1.0001, 1.0001] (all 2^31 of them, checked in numpy), and on magnitudes it takes the
    same decisions; tests/test_quantization.py checks this function at every decision point.
    """
    distance = tl.abs(value)
    magnitude = distance * 1.875  # on the format's own scale: largest value (1 + 7/8) * 2^0
    if SIGNED:  # exponent bias 15: smallest normal 2^-14, subnormal step 2^-14 / 8
        smallest_normal = 6.103515625e-05
        per_subnormal_step = 131072.0  # 2^17
        exponent_offset = 896  # (127 - 15) << 3: fp32's exponent bias to the format's, in codes
        largest = 127
    else:  # exponent bias 31
        smallest_normal = 9.313225746154785e-10  # 2^-30
        per_subnormal_step = 8589934592.0  # 2^33
        exponent_offset = 768  # (127 - 31) << 3
        largest = 255
    # Exponent and top 3 mantissa bits of the fp32 value are the code of a normal; a subnormal's is its multiple
    # of the subnormal step (the magnitude is capped first, so the conversion never overflows).
    normal = (magnitude.to(tl.int32, bitcast=True) >> 20) - exponent_offset
    subnormal = (tl.minimum(magnitude, smallest_normal) * per_subnormal_step).to(tl.int32)
    # The lower of the two candidates, at most the next to largest magnitude.
    low = tl.minimum(tl.maximum(tl.where(magnitude >= smallest_normal, normal, subnormal), 0), largest - 1)
    up = _magnitude_value(low + 1, SIGNED) - distance
    down = distance - _magnitude_value(low, SIGNED)
    if SIGNED:
        non_negative = value >= 0
        upper = tl.where(non_negative, up < down, up <= down).to(tl.int32)
        return tl.where(non_negative, 128 + low + upper, 127 - low - upper)
    return low + (up < down).to(tl.int32)


@triton.jit
def _load_quantized(codes_ptr, absmax_ptr, offsets, mask, blocks, block_mask, SIGNED: tl.constexpr):
    """Values of the codes at ``offsets`` (rows of QUANT_BLOCK elements, quantization block ``blocks[row]``): one
    absmax load a row, broadcast along it."""
    codes = tl.load(codes_ptr + offsets, mask=mask, other=0)
    absmax = tl.load(absmax_ptr + blocks, mask=block_mask, other=0.0)
    return _code_value(codes, SIGNED) * absmax[:, None]


@triton.jit
def _store_quantized(codes_ptr, absmax_ptr, offsets, value, mask, blocks, block_mask, SIGNED: tl.constexpr):
    """Quantize rows of QUANT_BLOCK values (quantization block ``blocks[row]``): one absmax a row of the values
    inside the tensor (NaN for a row with a non-finite value), and each value's nearest code."""
    # A NaN counts as Inf, so one max finds both the absmax and whether the block holds a non-finite value;
    # such a block's absmax is stored as NaN, so that all of it reads NaN from then on (no code holds NaN
    # or Inf, and a max that skipped it would hide it).
    magnitude = tl.abs(value)
    magnitude = tl.where(mask, tl.where(magnitude == magnitude, magnitude, float("inf")), 0.0)
    block_absmax = tl.max(magnitude, axis=1)
    # One IEEE reciprocal per block, then a product per value (an all-zero block: zeros).
    reciprocal = tl.div_rn(1.0, tl.where(block_absmax > 0, block_absmax, 1.0))
    tl.store(codes_ptr + offsets, _nearest_code(value * reciprocal[:, None], SIGNED).to(tl.uint8), mask=mask)
    stored_absmax = tl.where(block_absmax == float("inf"), float("nan"), block_absmax)
    tl.store(absmax_ptr + blocks, stored_absmax, mask=block_mask)


@triton.jit
def _tensor_of_chunk(chunk, chunk_offsets, n_tensors):
    """The tensor whose chunks include ``chunk``: the last t with chunk_offsets[t] <= chunk."""
    low = 0
    high = n_tensors
    while high - low > 1:
        middle = (low + high) // 2
        below = tl.load(chunk_offsets + middle) <= chunk
        low = tl.where(below, middle, low)
        high = tl.where(below, high, middle)
    return low


@triton.jit
def _table_pointer(row, column, TYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """The address in ``row[column]`` as a pointer to TYPE; with ALIGNED, declared 16-byte aligned (the caller
    has checked that it is)."""
    pointer = tl.load(row + column).to(tl.pointer_type(TYPE))
    if ALIGNED:
        pointer = tl.multiple_of(pointer, 16)
    return pointer


@triton.jit
def _update_chunk(
    row,
    chunk_start,
    bound,
    grad_multiplier,
    one_minus_beta1,
    one_minus_beta2,
    eps,
    l2_weight_decay,
    param_decay,
    step_size,
    bias_correction2_sqrt,
    PARAM_TYPE: tl.constexpr,
    STATE_TYPE: tl.constexpr,
    WEIGHT_DECAY: tl.constexpr,
    AMSGRAD: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    MASTER: tl.constexpr,
    QUANTIZED: tl.constexpr,
    GRAD_SCALING: tl.constexpr,
    ALIGNED: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One Adam step of the CHUNK elements from ``chunk_start`` of the tensor in table ``row``, BLOCK at a
    time, those below ``bound`` only (the tensor's end, or 0 where nothing is written). ALIGNED: every
    address the chunk is read and written through (param, grad, moments, max_exp_avg_sq, master) is 16-byte
    aligned and ``bound`` a multiple of CHUNK, which lets Triton load and store 16 bytes a thread at a time
    (it must know both the addresses' alignment and that the mask is the same over each 16 bytes).
    ``grad_multiplier`` is unused without GRAD_SCALING."""
    param_ptr = _table_pointer(row, PARAM_COLUMN, PARAM_TYPE, ALIGNED)
    grad_ptr = _table_pointer(row, GRAD_COLUMN, PARAM_TYPE, ALIGNED)
    exp_avg_ptr = _table_pointer(row, EXP_AVG_COLUMN, STATE_TYPE, ALIGNED)
    exp_avg_sq_ptr = _table_pointer(row, EXP_AVG_SQ_COLUMN, STATE_TYPE, ALIGNED)
    max_exp_avg_sq_ptr = _table_pointer(row, MAX_EXP_AVG_SQ_COLUMN, STATE_TYPE, ALIGNED)
    if MASTER == FP32_MASTER:
        master_ptr = _table_pointer(row, MASTER_COLUMN, tl.float32, ALIGNED)
    elif MASTER == LEAN_MASTER:
        master_ptr = _table_pointer(row, MASTER_COLUMN, tl.int16, ALIGNED)
    if QUANTIZED:
        exp_avg_absmax_ptr = tl.load(row + EXP_AVG_ABSMAX_COLUMN).to(tl.pointer_type(tl.float32))
        exp_avg_sq_absmax_ptr = tl.load(row + EXP_AVG_SQ_ABSMAX_COLUMN).to(tl.pointer_type(tl.float32))
    for block_start in range(0, CHUNK, BLOCK):
        first = chunk_start + block_start
        if QUANTIZED:  # a row per quantization block: its absmax is a reduction along the row, broadcast back
            rows = tl.arange(0, BLOCK // QUANT_BLOCK)
            offsets = first + (rows[:, None] * QUANT_BLOCK + tl.arange(0, QUANT_BLOCK)[None, :])
            blocks = first // QUANT_BLOCK + rows
            block_mask = blocks * QUANT_BLOCK < bound
        else:
            offsets = first + tl.arange(0, BLOCK)
        mask = offsets < bound
        if MASTER == FP32_MASTER:
            param = tl.load(master_ptr + offsets, mask=mask)
        elif MASTER == LEAN_MASTER:
            param = _load_lean_master(param_ptr, master_ptr, offsets, mask)
        else:
            param = tl.load(param_ptr + offsets, mask=mask).to(tl.float32)
        grad = tl.load(grad_ptr + offsets, mask=mask).to(tl.float32)
        if QUANTIZED:
            exp_avg = _load_quantized(exp_avg_ptr, exp_avg_absmax_ptr, offsets, mask, blocks, block_mask, True)
            exp_avg_sq = _load_quantized(
                exp_avg_sq_ptr, exp_avg_sq_absmax_ptr, offsets, mask, blocks, block_mask, False
            )
        else:
            exp_avg = tl.load(exp_avg_ptr + offsets, mask=mask).to(tl.float32)
            exp_avg_sq = tl.load(exp_avg_sq_ptr + offsets, mask=mask).to(tl.float32)

        if GRAD_SCALING:
            grad = grad * grad_multiplier
        if MAXIMIZE:
            grad = -grad
        if WEIGHT_DECAY == L2:
            grad = grad + l2_weight_decay * param
        elif WEIGHT_DECAY == DECOUPLED:
            param = param * param_decay

        # An infinite v stays infinite (NaN with a NaN grad), as in torch's beta2 * v + (1 - beta2) * g²;
        # the lerp alone would give Inf - Inf. (A decoded 8-bit v, a map entry times its block's absmax, is
        # never infinite.)
        exp_avg = _lerp(exp_avg, grad, one_minus_beta1)
        if QUANTIZED:
            exp_avg_sq = _lerp(exp_avg_sq, grad * grad, one_minus_beta2)
        else:
            v_from_inf = exp_avg_sq + one_minus_beta2 * grad * grad
            exp_avg_sq = tl.where(
                exp_avg_sq == float("inf"), v_from_inf, _lerp(exp_avg_sq, grad * grad, one_minus_beta2)
            )
        if AMSGRAD:
            max_exp_avg_sq = tl.load(max_exp_avg_sq_ptr + offsets, mask=mask).to(tl.float32)
            max_exp_avg_sq = tl.maximum(max_exp_avg_sq, exp_avg_sq, propagate_nan=tl.PropagateNan.ALL)
            _store_rounded(max_exp_avg_sq_ptr, offsets, max_exp_avg_sq, mask)
            second_moment = max_exp_avg_sq
        else:
            second_moment = exp_avg_sq

        denom = tl.div_rn(tl.sqrt_rn(second_moment), bias_correction2_sqrt) + eps
        param = param - step_size * tl.div_rn(exp_avg, denom)

        if MASTER == FP32_MASTER:
            tl.store(master_ptr + offsets, param, mask=mask)
        if MASTER == LEAN_MASTER:
            _store_lean_master(param_ptr, master_ptr, offsets, param, mask)
        else:
            _store_rounded(param_ptr, offsets, param, mask)
        if QUANTIZED:
            _store_quantized(exp_avg_ptr, exp_avg_absmax_ptr, offsets, exp_avg, mask, blocks, block_mask, True)
            _store_quantized(
                exp_avg_sq_ptr, exp_avg_sq_absmax_ptr, offsets, exp_avg_sq, mask, blocks, block_mask, False
            )
        else:
            _store_rounded(exp_avg_ptr, offsets, exp_avg, mask)
            _store_rounded(exp_avg_sq_ptr, offsets, exp_avg_sq, mask)


@triton.jit
def adam_step_kernel(
    pointers,
    numels,
    chunk_offsets,
    n_tensors,
    device_scalars,
    one_minus_beta1,
    one_minus_beta2,
    eps,
    l2_weight_decay,
    param_decay,
    step_size,
    bias_correction2_sqrt,
    decoupled_weight_decay,
    ln_beta1,
    ln_beta2,
    PARAM_TYPE: tl.constexpr,
    STATE_TYPE: tl.constexpr,
    WEIGHT_DECAY: tl.constexpr,
    AMSGRAD: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    MASTER: tl.constexpr,
    QUANTIZED: tl.constexpr,
    DEVICE_STEP: tl.constexpr,
    GRAD_SCALING: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """p -= step_size * m / (sqrt(v) / sqrt(1 - beta2**t) + eps), with step_size = lr / (1 - beta1**t).

    The scalars are ``adam_gpu.hyperparameters.StepScalars``, formed in float64 on the host. With
    DEVICE_STEP (capturable), lr is ``device_scalars[LR]`` and each tensor's step count is read from the
    table, and the kernel forms step_size, bias_correction2_sqrt and param_decay itself. With
    GRAD_SCALING, grads are multiplied by ``device_scalars[GRAD_MULTIPLIER]`` (AMP unscaling and the clip
    coefficient) and nothing is written when ``device_scalars[FOUND_INF]`` is not zero. 8-bit codes are decoded
    and encoded from their bits (no map is read).
    """
    chunk = tl.program_id(0).to(tl.int64)
    tensor = _tensor_of_chunk(chunk, chunk_offsets, n_tensors).to(tl.int64)
    n_elements = tl.load(numels + tensor)
    chunk_start = (chunk - tl.load(chunk_offsets + tensor)) * CHUNK
    row = pointers + tensor * ROW_WIDTH
    if DEVICE_STEP:
        lr = tl.load(device_scalars + LR)
        step = tl.load(tl.load(row + STEP_COLUMN).to(tl.pointer_type(tl.float32)))
        step_size = tl.div_rn(lr, _one_minus_exp(step * ln_beta1))
        bias_correction2_sqrt = tl.sqrt_rn(_one_minus_exp(step * ln_beta2))
        param_decay = 1.0 - lr * decoupled_weight_decay
    grad_multiplier = 1.0  # (unused without GRAD_SCALING)
    if GRAD_SCALING:
        grad_multiplier = tl.load(device_scalars + GRAD_MULTIPLIER)
        # found_inf: no element is written. (A scalar bool in the mask would be simpler, but Triton's
        # interpreter cannot AND a scalar bool with a block of them.)
        n_elements = n_elements * (tl.load(device_scalars + FOUND_INF) == 0.0).to(tl.int64)

    # A whole chunk of a tensor whose addresses are 16-byte aligned is masked against its own end, a multiple of
    # CHUNK, and its pointers declared aligned: Triton then vectorizes. Any other chunk is masked against the
    # tensor's end: scalar accesses. (Each call is compiled on its own: the hints stay in their branch.)
    addresses = tl.load(row + PARAM_COLUMN) | tl.load(row + GRAD_COLUMN) | tl.load(row + EXP_AVG_COLUMN)
    addresses |= tl.load(row + EXP_AVG_SQ_COLUMN) | tl.load(row + MAX_EXP_AVG_SQ_COLUMN)
    addresses |= tl.load(row + MASTER_COLUMN)  # (0 where there is no master)
    if (chunk_start + CHUNK <= n_elements) & (addresses % 16 == 0):
        _update_chunk(
            row, chunk_start, chunk_start + CHUNK, grad_multiplier,
            one_minus_beta1, one_minus_beta2, eps, l2_weight_decay, param_decay, step_size, bias_correction2_sqrt,
            PARAM_TYPE, STATE_TYPE, WEIGHT_DECAY, AMSGRAD, MAXIMIZE, MASTER, QUANTIZED, GRAD_SCALING, True, CHUNK,
            BLOCK,
        )  # fmt: skip
    else:
        _update_chunk(
            row, chunk_start, n_elements, grad_multiplier,
            one_minus_beta1, one_minus_beta2, eps, l2_weight_decay, param_decay, step_size, bias_correction2_sqrt,
            PARAM_TYPE, STATE_TYPE, WEIGHT_DECAY, AMSGRAD, MAXIMIZE, MASTER, QUANTIZED, GRAD_SCALING, False, CHUNK,
            BLOCK,
        )  # fmt: skip
