// The AVX-512 and AVX2 loops of csrc/cpu/adamw_kernels.cpp, written once. That file includes
// this one twice, in namespace avx512 and in namespace avx2, each time with kVectorBytes (64 or
// 32) defined and under a pragma that compiles every function defined here for that instruction
// set: see NOTE: [vector lanes] there. So it has no include guard, includes nothing (what it
// uses is included before) and means nothing on its own.

// N lanes of T in GCC's vector extension.
template <typename T, int N>
struct VectorTraits {
  typedef T type __attribute__((vector_size(N * sizeof(T))));
};
template <typename T, int N>
using VectorOf = typename VectorTraits<T, N>::type;

// kVectorBytes of float or double S: the opmath_t of adamw_element in vector_loop. load and store
// convert from and to a tensor's dtype (exactly, and to nearest-even); round_as(const T*, v)
// rounds v to T and back, as stabilized_grad does.
template <typename S>
struct Lanes {
  static constexpr int64_t kLanes = kVectorBytes / static_cast<int64_t>(sizeof(S));
  using Vector = VectorOf<S, kLanes>;
  using Bits = VectorOf<std::conditional_t<sizeof(S) == 4, uint32_t, uint64_t>, kLanes>;
  using Bits16 = VectorOf<uint16_t, kLanes>;
  Vector x;

  static Lanes set1(S value) { return {Vector{} + value}; }
  static Lanes load(const S* p) {
    Lanes v;
    std::memcpy(&v.x, p, sizeof v.x);
    return v;
  }
  static Lanes load(const c10::Half* p) { return widen_half(bits16_at(p)); }
  static Lanes load(const c10::BFloat16* p) { return widen_bfloat16(bits16_at(p)); }
  static void store(S* p, const Lanes& v) { std::memcpy(p, &v.x, sizeof v.x); }
  static void store(c10::Half* p, const Lanes& v) { store_bits16(p, narrow_half(v)); }
  static void store(c10::BFloat16* p, const Lanes& v) { store_bits16(p, narrow_bfloat16(v)); }
  static Lanes round_as(const S*, const Lanes& v) { return v; }
  static Lanes round_as(const c10::Half*, const Lanes& v) { return widen_half(narrow_half(v)); }
  static Lanes round_as(const c10::BFloat16*, const Lanes& v) {
    return widen_bfloat16(narrow_bfloat16(v));
  }

 private:
  static constexpr int kRoundNearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;

  static Bits16 bits16_at(const void* p) {
    Bits16 h;
    std::memcpy(&h, p, sizeof h);
    return h;
  }
  static void store_bits16(void* p, const Bits16& h) { std::memcpy(p, &h, sizeof h); }
  static Lanes widen_half(const Bits16& h) {
    if constexpr (kLanes == 16) {
      return {_mm512_cvtph_ps((__m256i)h)};
    } else {
      return {_mm256_cvtph_ps((__m128i)h)};
    }
  }
  static Bits16 narrow_half(const Lanes& v) {
    if constexpr (kLanes == 16) {
      return (Bits16)_mm512_cvtps_ph(v.x, kRoundNearest);
    } else {
      return (Bits16)_mm256_cvtps_ph(v.x, kRoundNearest);
    }
  }
  static Lanes widen_bfloat16(const Bits16& h) {
    Bits wide;
    if constexpr (kLanes == 16) {
      wide = (Bits)_mm512_cvtepu16_epi32((__m256i)h);
    } else {
      wide = (Bits)_mm256_cvtepu16_epi32((__m128i)h);
    }
    return {(Vector)(wide << 16)};
  }
  static Bits16 narrow_bfloat16(const Lanes& v) {
    const Bits bits = (Bits)v.x;
    const Bits rounded = (bits + ((bits >> 16) & 1) + 0x7FFF) >> 16;
    const Bits wide = v.x != v.x ? Bits{} + 0x7FC0 : rounded;
    if constexpr (kLanes == 16) {
      return (Bits16)_mm512_cvtepi32_epi16((__m512i)wide);
    } else {
      // packus works within 128-bit halves: gather the two useful 64-bit pieces.
      const __m256i packed = _mm256_packus_epi32((__m256i)wide, (__m256i)wide);
      return (Bits16)_mm256_castsi256_si128(_mm256_permute4x64_epi64(packed, 0b1000));
    }
  }
};

template <typename S>
inline Lanes<S> operator+(const Lanes<S>& a, const Lanes<S>& b) {
  return {a.x + b.x};
}
template <typename S>
inline Lanes<S> operator-(const Lanes<S>& a, const Lanes<S>& b) {
  return {a.x - b.x};
}
template <typename S>
inline Lanes<S> operator*(const Lanes<S>& a, const Lanes<S>& b) {
  return {a.x * b.x};
}
template <typename S>
inline Lanes<S> operator/(const Lanes<S>& a, const Lanes<S>& b) {
  return {a.x / b.x};
}
template <typename S>
inline Lanes<S> nan_max(const Lanes<S>& a, const Lanes<S>& b) {
  return {(a.x > b.x) | (a.x != a.x) ? a.x : b.x};
}
template <typename S>
inline Lanes<S> sqrt_of(const Lanes<S>& a) {
  constexpr bool kFloat = sizeof(S) == 4;
  if constexpr (kVectorBytes == 64) {
    if constexpr (kFloat) {
      return {_mm512_sqrt_ps(a.x)};
    } else {
      return {_mm512_sqrt_pd(a.x)};
    }
  } else if constexpr (kFloat) {
    return {_mm256_sqrt_ps(a.x)};
  } else {
    return {_mm256_sqrt_pd(a.x)};
  }
}

// The loop instances: `flatten` inlines vector_loop, adamw_element and everything above into
// one function of this instruction set.
struct Loops {
  template <typename scalar_t, typename V, bool kZeroGrad, bool kAmsgrad>
  __attribute__((flatten)) static void run(const AdamwRun& r,
                                           const AdamwConstants<opmath_of<scalar_t>>& c) {
    vector_loop<scalar_t, V, kZeroGrad, kAmsgrad>(r, c);
  }
};

template <typename scalar_t>
void adamw(const AdamwRun& run, const AdamwStep& step) {
  dispatch_loop<scalar_t, Lanes<opmath_of<scalar_t>>, Loops>(run, step);
}
