// The 8-bit step of whole blocks of float32 parameters, written with AVX-512 intrinsics.
// Part of cpu_kernel.cpp, included inside its anonymous namespace after the portable 8-bit
// loops, whose operations this repeats in the same order: decode8, update_value (as
// update_element calls it, with final_lr="auto"'s projection terms where they are asked
// for), keep_largest and encode8<true>, so the two compute the same bits (the tests compare
// this copy with the portable ones, which DYNABOUND_CPU_ISA=avx2 selects, and the
// reference). It is the one deliberate second copy of the update rule in this kernel: a
// change to update_value needs the same change here.
//
// Why by hand: compilers vectorise the portable loops as wide as their narrowest type, 64
// one-byte codes at a time, which spills, and so they pass the decoded moments and 32-bit
// codes through memory. Here 16 elements go through decode, update and the previous
// block's encoding in registers, and only the float32 moments that the next block's loop
// encodes are stored (measured here: 10-15% less time per element than the portable loops).

struct Wide8Constants {
  __m512 beta1, one_minus_beta1, beta2, one_minus_beta2, one, eps, numerator, lower, upper;
  __m512 rate_scale, sign, weight_decay, decay, box_lo, box_hi;
  __mmask16 coupled;

  DB_TARGET_AVX512 explicit Wide8Constants(const EncodedScalars& es) {
    const Scalars<float>& k = es.k;
    beta1 = _mm512_set1_ps(k.beta1);
    one_minus_beta1 = _mm512_set1_ps(k.one_minus_beta1);
    beta2 = _mm512_set1_ps(k.beta2);
    one_minus_beta2 = _mm512_set1_ps(k.one_minus_beta2);
    one = _mm512_set1_ps(1.0f);
    eps = _mm512_set1_ps(k.eps);
    numerator = _mm512_set1_ps(k.numerator);
    lower = _mm512_set1_ps(k.lower);
    upper = _mm512_set1_ps(k.upper);
    rate_scale = _mm512_set1_ps(k.rate_scale);
    sign = _mm512_set1_ps(k.sign);
    weight_decay = _mm512_set1_ps(k.weight_decay);
    decay = _mm512_set1_ps(k.decay);
    box_lo = _mm512_set1_ps(k.box_lo);
    box_hi = _mm512_set1_ps(k.box_hi);
    coupled = es.coupled ? __mmask16(0xFFFF) : __mmask16(0);
  }
};

DB_TARGET_AVX512 DB_INLINE __m512i mix32_x16(__m512i x) {
  x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
  x = _mm512_mullo_epi32(x, _mm512_set1_epi32(int32_t(0x7FEB352Du)));
  x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 15));
  x = _mm512_mullo_epi32(x, _mm512_set1_epi32(int32_t(0x846CA68Bu)));
  return _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
}

// decode8 of 16 bytes at `codes`: signed (first moment) or unsigned (second).
template <bool kSigned>
DB_TARGET_AVX512 DB_INLINE __m512 decode8_x16(const void* codes, int32_t offset, __m512 scale) {
  const __m128i bytes = _mm_loadu_si128(static_cast<const __m128i*>(codes));
  const __m512i code = kSigned ? _mm512_cvtepi8_epi32(bytes) : _mm512_cvtepu8_epi32(bytes);
  const __m512i magnitude = kSigned ? _mm512_abs_epi32(code) : code;
  const __mmask16 nonzero = _mm512_test_epi32_mask(code, code);
  __m512i bits = _mm512_maskz_slli_epi32(
      nonzero, _mm512_add_epi32(magnitude, _mm512_set1_epi32(offset)), kCut);
  if (kSigned) {  // bits | (code & sign bit): 0xF8 is a | (b & c) as a ternary truth table
    bits = _mm512_ternarylogic_epi32(bits, code, _mm512_set1_epi32(INT32_MIN), 0xF8);
  }
  return _mm512_mul_ps(_mm512_castsi512_ps(bits), scale);
}

// encode8<true> of 16 magnitudes, whose products with `inverse` are finite and non-negative;
// noise: 16 random bits in the low half of each lane. top - offset is clamped at 0 by an
// unsigned 16-bit saturating subtraction: top < 2^16, so the lanes' high halves stay 0.
DB_TARGET_AVX512 DB_INLINE __m512i encode8_x16(__m512 magnitude, __m512 inverse, __m512i noise,
                                               int32_t offset) {
  __m512i bits = _mm512_castps_si512(_mm512_mul_ps(magnitude, inverse));
  bits = _mm512_min_epu32(bits, _mm512_set1_epi32(0x3F800000));  // 1.0f
  const __m512i noisy = _mm512_add_epi32(bits, _mm512_slli_epi32(noise, kNoiseShift));
  return _mm512_subs_epu16(_mm512_srli_epi32(noisy, kCut), _mm512_set1_epi32(offset));
}

DB_TARGET_AVX512 DB_INLINE void store_codes_x16(void* codes, __m512i code) {
  _mm_storeu_si128(static_cast<__m128i*>(codes), _mm512_cvtepi32_epi8(code));
}

DB_TARGET_AVX512 DB_INLINE __m512i magnitude_bits(__m512 x) {
  return _mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(0x7FFFFFFF));
}

// EncodedSums in registers: lanes 0-7 in `low`, 8-15 in `high`, a block's float32 lane
// sums added as LaneSums::add_block adds them.
struct SumsX16 {
  __m512d squares_low, squares_high, along_low, along_high;

  DB_TARGET_AVX512 DB_INLINE void load(const EncodedSums& sums) {
    squares_low = _mm512_load_pd(sums.squares);
    squares_high = _mm512_load_pd(sums.squares + 8);
    along_low = _mm512_load_pd(sums.along);
    along_high = _mm512_load_pd(sums.along + 8);
  }
  DB_TARGET_AVX512 DB_INLINE void add_block(__m512 block_squares, __m512 block_along) {
    squares_low = _mm512_add_pd(squares_low, _mm512_cvtps_pd(low_half(block_squares)));
    squares_high = _mm512_add_pd(squares_high, _mm512_cvtps_pd(high_half(block_squares)));
    along_low = _mm512_add_pd(along_low, _mm512_cvtps_pd(low_half(block_along)));
    along_high = _mm512_add_pd(along_high, _mm512_cvtps_pd(high_half(block_along)));
  }
  static DB_TARGET_AVX512 DB_INLINE __m256 low_half(__m512 x) {
    return _mm512_castps512_ps256(x);
  }
  static DB_TARGET_AVX512 DB_INLINE __m256 high_half(__m512 x) {
    return _mm512_extractf32x8_ps(x, 1);
  }
  DB_TARGET_AVX512 DB_INLINE void store(EncodedSums& sums) const {
    _mm512_store_pd(sums.squares, squares_low);
    _mm512_store_pd(sums.squares + 8, squares_high);
    _mm512_store_pd(sums.along, along_low);
    _mm512_store_pd(sums.along + 8, along_high);
  }
};

// The block at `start`: decoded, updated (new moments into b, new scales into s) and, with
// kEncode, the pending block at pending_start encoded into its bytes in the same loop.
// kProject: its projection terms are added to sums.
template <bool AMS, bool kPlain, bool kEncode, bool kProject>
DB_TARGET_AVX512 DB_INLINE void update_block_x16(const EncodedTensor& t, int64_t start,
                                                 const Wide8Constants& c, Block8& b, Scales8& s,
                                                 const Pending8& pending, int64_t pending_start,
                                                 SumsX16& sums) {
  const int64_t block = start / kBlock;
  const int8_t* m_codes = static_cast<const int8_t*>(t.m) + start;
  const uint8_t* v_codes = static_cast<const uint8_t*>(t.v) + start;
  const uint8_t* vmax_codes = AMS ? static_cast<const uint8_t*>(t.vmax) + start : nullptr;
  float* __restrict p = static_cast<float*>(t.p) + start;
  const float* __restrict g = static_cast<const float*>(t.g) + start;
  const __m512 m_scale = _mm512_set1_ps(t.m_scale[block]);
  const __m512 v_scale = _mm512_set1_ps(t.v_scale[block]);
  const __m512 vmax_scale = _mm512_set1_ps(AMS ? t.vmax_scale[block] : 0.0f);
  float* __restrict new_m = b.m;
  float* __restrict new_v = b.v;
  float* __restrict new_vmax = b.vmax;
  __m512i m_top = _mm512_setzero_si512(), v_top = m_top, vmax_top = m_top;
  __m512 block_squares = _mm512_setzero_ps(), block_along = block_squares;  // kProject

  // The pending block: its moments, the inverses of its scales, its bytes and element keys.
  const float* __restrict old_m = kEncode ? pending.block->m : nullptr;
  const float* __restrict old_v = kEncode ? pending.block->v : nullptr;
  const float* __restrict old_vmax = kEncode ? pending.block->vmax : nullptr;
  int8_t* out_m = kEncode ? static_cast<int8_t*>(t.m) + pending_start : nullptr;
  uint8_t* out_v = kEncode ? static_cast<uint8_t*>(t.v) + pending_start : nullptr;
  uint8_t* out_vmax = kEncode && AMS ? static_cast<uint8_t*>(t.vmax) + pending_start : nullptr;
  const __m512 m_inverse = _mm512_set1_ps(kEncode ? pending.scales->m_inverse : 0.0f);
  const __m512 v_inverse = _mm512_set1_ps(kEncode ? pending.scales->v_inverse : 0.0f);
  const __m512 vmax_inverse = _mm512_set1_ps(kEncode ? pending.scales->vmax_inverse : 0.0f);
  __m512i index = _mm512_add_epi32(
      _mm512_set1_epi32(int32_t(pending.key)),
      _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));

  for (int32_t j = 0; j < kBlock; j += 16) {
    __m512 grad = _mm512_loadu_ps(g + j);
    __m512 param = _mm512_loadu_ps(p + j);
    if (!kPlain) {
      grad = _mm512_mul_ps(grad, c.sign);
      const __m512 coupled_grad = _mm512_add_ps(grad, _mm512_mul_ps(c.weight_decay, param));
      grad = _mm512_mask_blend_ps(c.coupled, grad, coupled_grad);
      param = _mm512_mul_ps(param, c.decay);
    }
    const __m512 m = decode8_x16<true>(m_codes + j, kFirstOffset, m_scale);
    const __m512 v = decode8_x16<false>(v_codes + j, kSecondOffset, v_scale);
    const __m512 avg = _mm512_add_ps(_mm512_mul_ps(m, c.beta1),
                                     _mm512_mul_ps(c.one_minus_beta1, grad));
    const __m512 avg_sq = _mm512_add_ps(
        _mm512_mul_ps(v, c.beta2), _mm512_mul_ps(_mm512_mul_ps(c.one_minus_beta2, grad), grad));
    __m512 second = avg_sq;
    if (AMS) {
      __m512 vmax = decode8_x16<false>(vmax_codes + j, kSecondOffset, vmax_scale);
      const __mmask16 take = _mm512_cmp_ps_mask(vmax, avg_sq, _CMP_LT_OQ) |
                             _mm512_cmp_ps_mask(avg_sq, avg_sq, _CMP_UNORD_Q);
      vmax = _mm512_mask_blend_ps(take, vmax, avg_sq);
      second = vmax;
      _mm512_store_ps(new_vmax + j, vmax);
      vmax_top = _mm512_max_epu32(vmax_top, magnitude_bits(vmax));
    }
    __m512 rate = _mm512_div_ps(c.one, _mm512_add_ps(_mm512_sqrt_ps(second), c.eps));
    rate = _mm512_mul_ps(rate, c.numerator);
    if (kProject) {
      const __m512 step = _mm512_mul_ps(rate, avg);
      block_squares = _mm512_add_ps(block_squares, _mm512_mul_ps(step, step));
      block_along = _mm512_add_ps(block_along, _mm512_mul_ps(step, grad));
    }
    // max(a, b) is a > b ? a : b, so NaN rates and parameters pass, as in update_element.
    rate = _mm512_max_ps(c.lower, rate);
    rate = _mm512_min_ps(c.upper, rate);
    rate = _mm512_mul_ps(rate, c.rate_scale);
    param = _mm512_sub_ps(param, _mm512_mul_ps(rate, avg));
    if (!kPlain) {
      param = _mm512_max_ps(c.box_lo, param);
      param = _mm512_min_ps(c.box_hi, param);
    }
    _mm512_storeu_ps(p + j, param);
    _mm512_store_ps(new_m + j, avg);
    _mm512_store_ps(new_v + j, avg_sq);
    m_top = _mm512_max_epu32(m_top, magnitude_bits(avg));
    v_top = _mm512_max_epu32(v_top, magnitude_bits(avg_sq));

    if (kEncode) {
      const __m512i random = mix32_x16(index);
      index = _mm512_add_epi32(index, _mm512_set1_epi32(16));
      const __m512 first = _mm512_load_ps(old_m + j);
      const __mmask16 negative = _mm512_cmp_ps_mask(first, _mm512_setzero_ps(), _CMP_LT_OQ);
      __m512i code = encode8_x16(_mm512_castsi512_ps(magnitude_bits(first)), m_inverse,
                                 _mm512_and_si512(random, _mm512_set1_epi32(0xFFFF)),
                                 kFirstOffset);
      store_codes_x16(out_m + j, _mm512_mask_sub_epi32(code, negative, _mm512_setzero_si512(), code));
      const __m512i high = _mm512_srli_epi32(random, 16);
      code = encode8_x16(_mm512_load_ps(old_v + j), v_inverse, high, kSecondOffset);
      store_codes_x16(out_v + j, code);
      if (AMS) {
        code = encode8_x16(_mm512_load_ps(old_vmax + j), vmax_inverse, high, kSecondOffset);
        store_codes_x16(out_vmax + j, code);
      }
    }
  }
  s.set(_mm512_reduce_max_epu32(m_top), _mm512_reduce_max_epu32(v_top),
        AMS ? _mm512_reduce_max_epu32(vmax_top) : 0u);
  if (kProject) sums.add_block(block_squares, block_along);
}

// Whole blocks from `start` on, through the pipeline of update_8bit_body; returns where
// they end. A pending block whose scales are not finite is encoded by the exact portable
// loop instead.
template <bool AMS, bool kProject>
DB_TARGET_AVX512 __attribute__((noinline)) int64_t update_whole_blocks_avx512(
    const EncodedTensor& t, int64_t start, int64_t end, Pipeline8& pipe,
    const EncodedScalars& es, EncodedSums* sums) {
  const Wide8Constants c(es);
  SumsX16 in_registers;
  if (kProject) in_registers.load(*sums);
  for (; end - start >= kBlock; start += kBlock) {
    Block8& b = pipe.blocks[pipe.current];
    Scales8& s = pipe.scales[pipe.current];
    const Pending8 pending = pipe.pending(es);
    const int64_t pending_start = pipe.previous_start;
    const bool encode = pending_start >= 0 && pending.scales->finite;
    if (es.plain && encode) {
      update_block_x16<AMS, true, true, kProject>(t, start, c, b, s, pending, pending_start,
                                                  in_registers);
    } else if (es.plain) {
      update_block_x16<AMS, true, false, kProject>(t, start, c, b, s, pending, pending_start,
                                                   in_registers);
    } else if (encode) {
      update_block_x16<AMS, false, true, kProject>(t, start, c, b, s, pending, pending_start,
                                                   in_registers);
    } else {
      update_block_x16<AMS, false, false, kProject>(t, start, c, b, s, pending, pending_start,
                                                    in_registers);
    }
    if (encode) {
      store_scales<AMS>(t, pending_start, *pending.scales);
    } else if (pending_start >= 0) {
      encode_rest<AMS, false>(*pending.block, 0, kBlock, pending.key, *pending.scales,
                              pipe.codes);
      store_block<AMS>(t, pending_start, kBlock, pipe.codes, *pending.scales);
    }
    pipe.advance(start);
  }
  if (kProject) in_registers.store(*sums);
  return start;
}
