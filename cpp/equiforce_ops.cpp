// equiforce::tp_scatter — the message-passing kernel of an interaction layer, fused on the CPU.
//
// One call does what the PyTorch path of equiforce/model.py does with a gather, the per-path
// Clebsch-Gordan products of equiforce/tensor_product.py and a scatter-sum:
//
//   out[n, g, k, u] = sum_{e: dst[e] = n} w[windex[e], path(g, k), u] * sum_i M_g[e][i, k] x[src[e], g, i, u]
//   M_g[e][i, k]    = sum_j sh[e, sh_off_g + j] * C_g[j, i, k]
//
// with no per-edge intermediate ([E, 2l+1, channels] per path) ever stored: the forward pass keeps
// nothing but its inputs, and the backward pass (first derivatives with respect to x, sh and w:
// what forces and the virial need) recomputes M per edge. Memory per edge is that of the inputs.
//
// Layouts (all contiguous; scalar type float32 or float64, the same for x, sh, w, cg):
//   x   [N, Dx]   per atom, the merged input blocks of EdgeTensorProduct ("gather sets") one after
//                 the other, each component-major: element (i, u) of block at in_off is x[in_off + i*mul + u]
//   sh  [E, Dsh]  edge harmonics (already scaled by envelope and message normalisation)
//   w   [U, W]    radial weights, merged path order: path t of group g at w_off_g + t*mul_g
//   windex [E]    int64 row of w for each edge (reverse edges share one row: see radial_pairs)
//   src, dst [E]  int64 atom indices in [0, N) (any order)
//   groups [G, 10] int64 per merged group: in_off, d1, mul, sh_off, d2, cg_off, d3, out_off, w_off, k_off
//   kpath  [K] int64: for output column k of group g, its path inside the group (kpath[k_off_g + k])
//   cg  [*]       C_g[j, i, k] at cg_off_g + (j*d1 + i)*d3 + k (unit-norm CG times sqrt(2 l3 + 1))
//   out [N, Dout] group g's [d3, mul] block at out_off_g, component-major
//
// Threads: at::parallel_for over the rows a pass writes. The forward pass visits edges grouped by
// dst; the backward pass twice: grouped by row of w (gradients of w and sh; both edges of a reverse
// pair in one iteration), then grouped by src (gradient of x). Counting sorts, O(E); every thread
// owns the rows it accumulates into: no atomics, no per-thread copies, no zero-filled buffers,
// results independent of the thread count. No second derivative in the op's own autograd: its
// backward refuses to run under create_graph. Training with a force loss needs one; it uses the
// Python wrapper _TpScatterFn (equiforce/nn/tensor_product.py), which builds every derivative order
// from tp_scatter and tp_scatter_backward (the op is trilinear in x, sh and w).
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/torch.h>

#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

namespace {

using torch::Tensor;

constexpr int kCols = 10;  // columns of the groups table

struct Group {
  int64_t in_off, d1, mul, sh_off, d2, cg_off, d3, out_off, w_off, k_off;
};

// nonzero (i, k) entries of a group's M = Y @ C (the same for every edge), grouped by k
struct Sparsity {
  std::vector<int64_t> pair_i, pair_k;   // nonzero pairs, k ascending
  std::vector<int64_t> k_begin;          // pairs of column k: [k_begin[k], k_begin[k + 1])
};

std::vector<Group> read_groups(const Tensor &groups) {
  TORCH_CHECK(groups.dim() == 2 && groups.size(1) == kCols && groups.scalar_type() == torch::kInt64,
              "equiforce::tp_scatter: groups must be an int64 [G, ", kCols, "] table");
  auto g = groups.contiguous();
  const int64_t *p = g.data_ptr<int64_t>();
  std::vector<Group> out(g.size(0));
  for (int64_t r = 0; r < g.size(0); ++r) {
    const int64_t *q = p + r * kCols;
    out[r] = Group{q[0], q[1], q[2], q[3], q[4], q[5], q[6], q[7], q[8], q[9]};
  }
  return out;
}

template <typename T>
std::vector<Sparsity> sparsity(const std::vector<Group> &groups, const T *cg) {
  std::vector<Sparsity> out(groups.size());
  for (size_t g = 0; g < groups.size(); ++g) {
    const Group &G = groups[g];
    Sparsity &s = out[g];
    s.k_begin.assign(G.d3 + 1, 0);
    for (int64_t k = 0; k < G.d3; ++k) {
      s.k_begin[k] = static_cast<int64_t>(s.pair_i.size());
      for (int64_t i = 0; i < G.d1; ++i) {
        bool nz = false;
        for (int64_t j = 0; j < G.d2; ++j) nz = nz || cg[G.cg_off + (j * G.d1 + i) * G.d3 + k] != T(0);
        if (nz) {
          s.pair_i.push_back(i);
          s.pair_k.push_back(k);
        }
      }
    }
    s.k_begin[G.d3] = static_cast<int64_t>(s.pair_i.size());
  }
  return out;
}

// edges grouped by key (counting sort): order[ptr[a] .. ptr[a + 1]) are the edges with key a
void group_edges(const Tensor &key, int64_t n, const char *what, std::vector<int64_t> &ptr,
                 std::vector<int64_t> &order, const char *op = "equiforce::tp_scatter") {
  const int64_t e = key.size(0);
  const int64_t *k = key.data_ptr<int64_t>();
  ptr.assign(n + 1, 0);
  for (int64_t a = 0; a < e; ++a) {
    TORCH_CHECK(k[a] >= 0 && k[a] < n, op, ": ", what, " index ", k[a], " of edge ", a, " is outside [0, ", n, ")");
    ++ptr[k[a] + 1];
  }
  for (int64_t a = 0; a < n; ++a) ptr[a + 1] += ptr[a];
  order.resize(e);
  std::vector<int64_t> fill(ptr.begin(), ptr.end() - 1);
  for (int64_t a = 0; a < e; ++a) order[fill[k[a]]++] = a;
}

void check_range(const Tensor &index, int64_t n, const char *what) {
  const int64_t e = index.numel();
  const int64_t *k = index.data_ptr<int64_t>();
  for (int64_t a = 0; a < e; ++a)
    TORCH_CHECK(k[a] >= 0 && k[a] < n, "equiforce::tp_scatter: ", what, " index ", k[a], " of edge ", a,
                " is outside [0, ", n, ")");
}

// the pass bodies and their helpers are forced inline into the per-instruction-set functions below
// (a target attribute compiles only that function's own body for AVX2/AVX-512; a call to a shared
// function would run the default SSE2 code)
#define EQUIFORCE_INLINE inline __attribute__((always_inline))

// M values of group g for one edge, in the order of its nonzero pairs
template <typename T>
EQUIFORCE_INLINE void edge_m(const Group &G, const Sparsity &s, const T *cg, const T *y, T *m) {
  const size_t np = s.pair_i.size();
  for (size_t p = 0; p < np; ++p) {
    const int64_t i = s.pair_i[p], k = s.pair_k[p];
    T acc = 0;
    for (int64_t j = 0; j < G.d2; ++j) acc += y[j] * cg[G.cg_off + (j * G.d1 + i) * G.d3 + k];
    m[p] = acc;
  }
}

struct Inputs {
  std::vector<Group> groups;
  std::vector<Sparsity> sp;
  const int64_t *kpath;
  int64_t dx, dsh, dw, dout, max_pairs, max_mul;
};

// pointers of one call; gx, gsh, gw null when that gradient is not needed
template <typename T>
struct Args {
  const T *x, *sh, *w, *cg, *gout;
  const int64_t *src, *dst, *windex;
  T *out, *gx, *gsh, *gw;
  const int64_t *ptr, *order;  // edges grouped by the rows the current pass owns
};

template <typename T>
struct Scratch {
  std::vector<T> m, gm, t, wg;
  explicit Scratch(const Inputs &in) : m(in.max_pairs), gm(in.max_pairs), t(in.max_mul), wg(in.max_mul) {}
};

// t[u] = sum_i M[i, k] x[i, u] over the nonzero pairs of column k
template <typename T>
EQUIFORCE_INLINE void column(const Sparsity &s, int64_t k, int64_t mul, const T *mm, const T *xg, T *__restrict t) {
  const int64_t p0 = s.k_begin[k], p1 = s.k_begin[k + 1];
  {
    const T mv = mm[p0];
    const T *__restrict xi = xg + s.pair_i[p0] * mul;
    for (int64_t u = 0; u < mul; ++u) t[u] = mv * xi[u];
  }
  for (int64_t p = p0 + 1; p < p1; ++p) {
    const T mv = mm[p];
    const T *__restrict xi = xg + s.pair_i[p] * mul;
    for (int64_t u = 0; u < mul; ++u) t[u] += mv * xi[u];
  }
}

// forward, atoms [begin, end) (edges grouped by dst): their rows of out
template <typename T>
EQUIFORCE_INLINE void forward_rows(const Inputs &in, const Args<T> &a, int64_t begin, int64_t end) {
  Scratch<T> sc(in);
  T *__restrict t = sc.t.data();
  for (int64_t n = begin; n < end; ++n) {
    T *orow = a.out + n * in.dout;
    for (int64_t c = 0; c < in.dout; ++c) orow[c] = T(0);
    for (int64_t q = a.ptr[n]; q < a.ptr[n + 1]; ++q) {
      const int64_t e = a.order[q];
      const T *xrow = a.x + a.src[e] * in.dx;
      const T *yrow = a.sh + e * in.dsh;
      const T *wrow = a.w + a.windex[e] * in.dw;
      for (size_t g = 0; g < in.groups.size(); ++g) {
        const Group &G = in.groups[g];
        const Sparsity &s = in.sp[g];
        const int64_t mul = G.mul;
        edge_m(G, s, a.cg, yrow + G.sh_off, sc.m.data());
        for (int64_t k = 0; k < G.d3; ++k) {
          if (s.k_begin[k] == s.k_begin[k + 1]) continue;
          column(s, k, mul, sc.m.data(), xrow + G.in_off, t);
          const T *__restrict wk = wrow + G.w_off + in.kpath[G.k_off + k] * mul;
          T *__restrict ok = orow + G.out_off + k * mul;
          for (int64_t u = 0; u < mul; ++u) ok[u] += wk[u] * t[u];
        }
      }
    }
  }
}

// backward pass A, rows [begin, end) of w (edges grouped by windex): gw rows, and gsh of their edges.
// Edges sharing a row of w (reverse pairs) are handled by the same iteration: no write conflicts.
template <typename T>
EQUIFORCE_INLINE void backward_weights(const Inputs &in, const Args<T> &a, int64_t begin, int64_t end) {
  Scratch<T> sc(in);
  T *__restrict t = sc.t.data();
  T *__restrict wg = sc.wg.data();
  T *__restrict gmm = sc.gm.data();
  for (int64_t r = begin; r < end; ++r) {
    T *gwrow = a.gw ? a.gw + r * in.dw : nullptr;
    if (gwrow)
      for (int64_t c = 0; c < in.dw; ++c) gwrow[c] = T(0);
    const T *wrow = a.w + r * in.dw;
    for (int64_t q = a.ptr[r]; q < a.ptr[r + 1]; ++q) {
      const int64_t e = a.order[q];
      const T *xrow = a.x + a.src[e] * in.dx;
      const T *grow = a.gout + a.dst[e] * in.dout;
      const T *yrow = a.sh + e * in.dsh;
      T *gy = a.gsh ? a.gsh + e * in.dsh : nullptr;
      if (gy)
        for (int64_t c = 0; c < in.dsh; ++c) gy[c] = T(0);
      for (size_t g = 0; g < in.groups.size(); ++g) {
        const Group &G = in.groups[g];
        const Sparsity &s = in.sp[g];
        const int64_t mul = G.mul;
        const T *xg = xrow + G.in_off;
        edge_m(G, s, a.cg, yrow + G.sh_off, sc.m.data());
        for (int64_t k = 0; k < G.d3; ++k) {
          const int64_t p0 = s.k_begin[k], p1 = s.k_begin[k + 1];
          if (p0 == p1) continue;
          const int64_t woff = G.w_off + in.kpath[G.k_off + k] * mul;
          const T *__restrict gk = grow + G.out_off + k * mul;
          if (gwrow) {
            column(s, k, mul, sc.m.data(), xg, t);
            T *__restrict gwk = gwrow + woff;
            for (int64_t u = 0; u < mul; ++u) gwk[u] += gk[u] * t[u];
          }
          if (gy) {
            const T *__restrict wk = wrow + woff;
            for (int64_t u = 0; u < mul; ++u) wg[u] = wk[u] * gk[u];
            for (int64_t p = p0; p < p1; ++p) {
              const T *__restrict xi = xg + s.pair_i[p] * mul;
              T acc = 0;
              // a reduction: GCC vectorises it only when allowed to reorder the sum (-19 % of the
              // backward pass in float32, -10 % in float64, bench/isa_compare.py)
#pragma omp simd reduction(+ : acc)
              for (int64_t u = 0; u < mul; ++u) acc += xi[u] * wg[u];
              gmm[p] = acc;
            }
          }
        }
        if (gy) {  // d/d sh_j = sum over pairs of C[j, i, k] dM[i, k]
          const size_t np = s.pair_i.size();
          for (size_t p = 0; p < np; ++p) {
            const int64_t i = s.pair_i[p], k = s.pair_k[p];
            for (int64_t j = 0; j < G.d2; ++j)
              gy[G.sh_off + j] += gmm[p] * a.cg[G.cg_off + (j * G.d1 + i) * G.d3 + k];
          }
        }
      }
    }
  }
}

// backward pass B, atoms [begin, end) (edges grouped by src): their rows of gx
template <typename T>
EQUIFORCE_INLINE void backward_inputs(const Inputs &in, const Args<T> &a, int64_t begin, int64_t end) {
  Scratch<T> sc(in);
  T *__restrict wg = sc.wg.data();
  for (int64_t n = begin; n < end; ++n) {
    T *gxrow = a.gx + n * in.dx;
    for (int64_t c = 0; c < in.dx; ++c) gxrow[c] = T(0);
    for (int64_t q = a.ptr[n]; q < a.ptr[n + 1]; ++q) {
      const int64_t e = a.order[q];
      const T *grow = a.gout + a.dst[e] * in.dout;
      const T *yrow = a.sh + e * in.dsh;
      const T *wrow = a.w + a.windex[e] * in.dw;
      for (size_t g = 0; g < in.groups.size(); ++g) {
        const Group &G = in.groups[g];
        const Sparsity &s = in.sp[g];
        const int64_t mul = G.mul;
        edge_m(G, s, a.cg, yrow + G.sh_off, sc.m.data());
        T *gxg = gxrow + G.in_off;
        for (int64_t k = 0; k < G.d3; ++k) {
          const int64_t p0 = s.k_begin[k], p1 = s.k_begin[k + 1];
          if (p0 == p1) continue;
          const T *__restrict wk = wrow + G.w_off + in.kpath[G.k_off + k] * mul;
          const T *__restrict gk = grow + G.out_off + k * mul;
          for (int64_t u = 0; u < mul; ++u) wg[u] = wk[u] * gk[u];
          for (int64_t p = p0; p < p1; ++p) {
            const T mv = sc.m[p];
            T *__restrict gxi = gxg + s.pair_i[p] * mul;
            for (int64_t u = 0; u < mul; ++u) gxi[u] += mv * wg[u];
          }
        }
      }
    }
  }
}

// One compiled body per instruction set: AVX-512 (512-bit vectors), AVX2 + FMA (what every x86-64-v3
// CPU has: AMD Zen, Intel since Haswell) and the wheel's baseline (SSE2). FMA is named explicitly:
// GCC's "avx2" target alone does not imply it, and without it every multiply-add of the AVX2 body
// is two instructions. The body is picked once per process (cpu_isa()): the best the CPU supports,
// or the one named by EQUIFORCE_CPU_ISA=avx512|avx2|sse2. On AMD CPUs with AVX-512 (Zen 4, which
// executes 512-bit operations as two 256-bit halves) the default is the AVX2 body: measured on an
// EPYC (family 25) it gave 3-13 % more atom-evals/s for the whole exported call than the AVX-512 one
// (bench/speed.py, README "Speed where users run it"); EQUIFORCE_CPU_ISA=avx512 still selects it.
enum class Isa { kSse2 = 0, kAvx2 = 1, kAvx512 = 2 };

Isa detect_isa() {
  __builtin_cpu_init();
  Isa supported = Isa::kSse2;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) supported = Isa::kAvx2;
  if (supported == Isa::kAvx2 && __builtin_cpu_supports("avx512f")) supported = Isa::kAvx512;
  const Isa best = (supported == Isa::kAvx512 && __builtin_cpu_is("amd")) ? Isa::kAvx2 : supported;
  const char *env = std::getenv("EQUIFORCE_CPU_ISA");
  if (env == nullptr || env[0] == '\0') return best;
  const std::string want(env);
  Isa asked;
  if (want == "avx512") asked = Isa::kAvx512;
  else if (want == "avx2") asked = Isa::kAvx2;
  else if (want == "sse2") asked = Isa::kSse2;
  else
    TORCH_CHECK(false, "equiforce: EQUIFORCE_CPU_ISA='", want,
                "' is not one of avx512, avx2, sse2; unset it to use the best the CPU supports");
  TORCH_CHECK(static_cast<int>(asked) <= static_cast<int>(supported), "equiforce: EQUIFORCE_CPU_ISA='", want,
              "' but this CPU does not support it; unset it or name a lower one (avx2, sse2)");
  return asked;
}

Isa cpu_isa_level() {
  static const Isa isa = detect_isa();
  return isa;
}

std::string cpu_isa() {
  switch (cpu_isa_level()) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "sse2";
  }
}

#define EQUIFORCE_AVX512 __attribute__((target("avx512f,avx2,fma")))
#define EQUIFORCE_AVX2 __attribute__((target("avx2,fma")))
#define EQUIFORCE_PASS_T(name, body, T)                                                               \
  EQUIFORCE_AVX512 void name##_avx512(const Inputs &in, const Args<T> &a, int64_t b, int64_t e) {   \
    body<T>(in, a, b, e);                                                                             \
  }                                                                                                   \
  EQUIFORCE_AVX2 void name##_avx2(const Inputs &in, const Args<T> &a, int64_t b, int64_t e) {       \
    body<T>(in, a, b, e);                                                                             \
  }                                                                                                   \
  void name##_sse2(const Inputs &in, const Args<T> &a, int64_t b, int64_t e) { body<T>(in, a, b, e); } \
  void name(const Inputs &in, const Args<T> &a, int64_t b, int64_t e) {                              \
    switch (cpu_isa_level()) {                                                                        \
      case Isa::kAvx512: return name##_avx512(in, a, b, e);                                           \
      case Isa::kAvx2: return name##_avx2(in, a, b, e);                                               \
      default: return name##_sse2(in, a, b, e);                                                       \
    }                                                                                                 \
  }
#define EQUIFORCE_PASS(name, body)      \
  EQUIFORCE_PASS_T(name, body, float)   \
  EQUIFORCE_PASS_T(name, body, double)
EQUIFORCE_PASS(forward_pass, forward_rows)
EQUIFORCE_PASS(weights_pass, backward_weights)
EQUIFORCE_PASS(inputs_pass, backward_inputs)
#undef EQUIFORCE_PASS_T
#undef EQUIFORCE_PASS

Inputs check_inputs(const Tensor &x, const Tensor &sh, const Tensor &w, const Tensor &windex, const Tensor &src,
                    const Tensor &dst, int64_t n, const Tensor &groups, const Tensor &kpath, const Tensor &cg) {
  const char *op = "equiforce::tp_scatter: ";
  for (const Tensor *t : {&x, &sh, &w, &windex, &src, &dst, &groups, &kpath, &cg})
    TORCH_CHECK(t->device().is_cpu(), op, "runs on the CPU only and got a tensor on ", t->device(),
                " (models take their PyTorch path on other devices)");
  TORCH_CHECK(x.dim() == 2 && x.size(0) == n, op, "x must be [n, Dx] with n = ", n, ", got ", x.sizes());
  TORCH_CHECK(sh.dim() == 2 && w.dim() == 2 && windex.dim() == 1 && src.dim() == 1 && dst.dim() == 1, op,
              "sh [E, Dsh], w [U, W], windex [E], src [E], dst [E] expected");
  const int64_t e = sh.size(0);
  TORCH_CHECK(windex.size(0) == e && src.size(0) == e && dst.size(0) == e, op, "sh, windex, src, dst disagree "
              "on the number of edges: ", e, ", ", windex.size(0), ", ", src.size(0), ", ", dst.size(0));
  TORCH_CHECK(x.scalar_type() == sh.scalar_type() && x.scalar_type() == w.scalar_type() &&
                  x.scalar_type() == cg.scalar_type(),
              op, "x, sh, w and cg must share one dtype");
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 || x.scalar_type() == torch::kFloat64, op,
              "float32 or float64 expected, got ", x.scalar_type());
  TORCH_CHECK(src.scalar_type() == torch::kInt64 && dst.scalar_type() == torch::kInt64 &&
                  windex.scalar_type() == torch::kInt64 && kpath.scalar_type() == torch::kInt64,
              op, "windex, src, dst and kpath must be int64");
  Inputs in;
  in.groups = read_groups(groups);
  in.dx = x.size(1);
  in.dsh = sh.size(1);
  in.dw = w.size(1);
  in.dout = 0;
  in.max_mul = 1;
  const int64_t ncg = cg.numel(), nk = kpath.numel();
  for (const Group &G : in.groups) {
    TORCH_CHECK(G.d1 >= 1 && G.d2 >= 1 && G.d3 >= 1 && G.mul >= 1, op, "bad group table");
    TORCH_CHECK(G.in_off >= 0 && G.in_off + G.d1 * G.mul <= in.dx, op, "group input block outside x");
    TORCH_CHECK(G.sh_off >= 0 && G.sh_off + G.d2 <= in.dsh, op, "group harmonic block outside sh");
    TORCH_CHECK(G.cg_off >= 0 && G.cg_off + G.d2 * G.d1 * G.d3 <= ncg, op, "group CG block outside cg");
    TORCH_CHECK(G.k_off >= 0 && G.k_off + G.d3 <= nk, op, "group columns outside kpath");
    TORCH_CHECK(G.out_off >= 0 && G.w_off >= 0, op, "bad group table");
    in.dout = std::max(in.dout, G.out_off + G.d3 * G.mul);
    in.max_mul = std::max(in.max_mul, G.mul);
  }
  in.kpath = kpath.data_ptr<int64_t>();
  for (const Group &G : in.groups)
    for (int64_t k = 0; k < G.d3; ++k) {
      const int64_t t = in.kpath[G.k_off + k];
      TORCH_CHECK(t >= 0 && G.w_off + (t + 1) * G.mul <= in.dw, op, "group weights outside w");
    }
  return in;
}

template <typename T>
void prepare(Inputs &in, const Tensor &cg) {
  in.sp = sparsity<T>(in.groups, cg.data_ptr<T>());
  in.max_pairs = 1;
  for (const Sparsity &s : in.sp) in.max_pairs = std::max<int64_t>(in.max_pairs, s.pair_i.size());
}

template <typename T>
Args<T> pointers(const Tensor &x, const Tensor &sh, const Tensor &w, const Tensor &windex, const Tensor &src,
                 const Tensor &dst, const Tensor &cg) {
  Args<T> a{};
  a.x = x.data_ptr<T>();
  a.sh = sh.data_ptr<T>();
  a.w = w.data_ptr<T>();
  a.cg = cg.data_ptr<T>();
  a.src = src.data_ptr<int64_t>();
  a.dst = dst.data_ptr<int64_t>();
  a.windex = windex.data_ptr<int64_t>();
  return a;
}

template <typename T>
Tensor forward_impl(Inputs &in, const Tensor &x, const Tensor &sh, const Tensor &w, const Tensor &windex,
                    const Tensor &src, const Tensor &dst, int64_t n, const Tensor &cg) {
  prepare<T>(in, cg);
  check_range(src, n, "src");
  check_range(windex, w.size(0), "windex");
  std::vector<int64_t> ptr, order;
  group_edges(dst, n, "dst", ptr, order);
  Tensor out = torch::empty({n, in.dout}, x.options());
  Args<T> a = pointers<T>(x, sh, w, windex, src, dst, cg);
  a.out = out.data_ptr<T>();
  a.ptr = ptr.data();
  a.order = order.data();
  at::parallel_for(0, n, 16, [&](int64_t b, int64_t e) { forward_pass(in, a, b, e); });
  return out;
}

// the op without autograd: out [n, Dout]
Tensor tp_scatter_forward(const Tensor &x_, const Tensor &sh_, const Tensor &w_, const Tensor &windex_,
                          const Tensor &src_, const Tensor &dst_, int64_t n, const Tensor &groups,
                          const Tensor &kpath_, const Tensor &cg_) {
  Tensor x = x_.contiguous(), sh = sh_.contiguous(), w = w_.contiguous(), windex = windex_.contiguous(),
         src = src_.contiguous(), dst = dst_.contiguous(), kpath = kpath_.contiguous(), cg = cg_.contiguous();
  Inputs in = check_inputs(x, sh, w, windex, src, dst, n, groups, kpath, cg);
  if (x.scalar_type() == torch::kFloat64) return forward_impl<double>(in, x, sh, w, windex, src, dst, n, cg);
  return forward_impl<float>(in, x, sh, w, windex, src, dst, n, cg);
}

template <typename T>
std::vector<Tensor> backward_impl(Inputs &in, const Tensor &x, const Tensor &sh, const Tensor &w,
                                  const Tensor &windex, const Tensor &src, const Tensor &dst, int64_t n,
                                  const Tensor &cg, const Tensor &gout, bool need_x, bool need_sh, bool need_w) {
  prepare<T>(in, cg);
  Tensor gx = need_x ? torch::empty_like(x) : Tensor();
  Tensor gsh = need_sh ? torch::empty_like(sh) : Tensor();
  Tensor gw = need_w ? torch::empty_like(w) : Tensor();
  Args<T> a = pointers<T>(x, sh, w, windex, src, dst, cg);
  a.gout = gout.data_ptr<T>();
  std::vector<int64_t> ptr, order;
  if (need_sh || need_w) {
    const int64_t u = w.size(0);
    group_edges(windex, u, "windex", ptr, order);
    a.gsh = need_sh ? gsh.data_ptr<T>() : nullptr;
    a.gw = need_w ? gw.data_ptr<T>() : nullptr;
    a.ptr = ptr.data();
    a.order = order.data();
    at::parallel_for(0, u, 64, [&](int64_t b, int64_t e) { weights_pass(in, a, b, e); });
  }
  if (need_x) {
    group_edges(src, n, "src", ptr, order);
    a.gx = gx.data_ptr<T>();
    a.ptr = ptr.data();
    a.order = order.data();
    at::parallel_for(0, n, 16, [&](int64_t b, int64_t e) { inputs_pass(in, a, b, e); });
  }
  return {gx, gsh, gw};
}

// the op's first backward without autograd: (gx, gsh, gw) for the output gradient gout [n, Dout];
// an empty tensor where need_* is false. The op is trilinear in (x, sh, w), so its second
// derivatives are again forward and backward calls with substituted arguments: training (force loss,
// create_graph) builds them in Python from this op and tp_scatter (equiforce/nn/tensor_product.py).
std::vector<Tensor> tp_scatter_backward(const Tensor &x_, const Tensor &sh_, const Tensor &w_,
                                        const Tensor &windex_, const Tensor &src_, const Tensor &dst_, int64_t n,
                                        const Tensor &groups, const Tensor &kpath_, const Tensor &cg_,
                                        const Tensor &gout_, bool need_x, bool need_sh, bool need_w) {
  Tensor x = x_.contiguous(), sh = sh_.contiguous(), w = w_.contiguous(), windex = windex_.contiguous(),
         src = src_.contiguous(), dst = dst_.contiguous(), kpath = kpath_.contiguous(), cg = cg_.contiguous(),
         gout = gout_.contiguous();
  Inputs in = check_inputs(x, sh, w, windex, src, dst, n, groups, kpath, cg);
  TORCH_CHECK(gout.dim() == 2 && gout.size(0) == n && gout.size(1) == in.dout &&
                  gout.scalar_type() == x.scalar_type() && gout.device().is_cpu(),
              "equiforce::tp_scatter_backward: unexpected output gradient ", gout.sizes());
  check_range(src, n, "src");
  check_range(dst, n, "dst");
  std::vector<Tensor> g =
      x.scalar_type() == torch::kFloat64
          ? backward_impl<double>(in, x, sh, w, windex, src, dst, n, cg, gout, need_x, need_sh, need_w)
          : backward_impl<float>(in, x, sh, w, windex, src, dst, n, cg, gout, need_x, need_sh, need_w);
  for (Tensor &t : g)
    if (!t.defined()) t = torch::empty({0}, x.options());  // not needed: an empty tensor
  return g;
}

class TpScatter : public torch::autograd::Function<TpScatter> {
 public:
  static Tensor forward(torch::autograd::AutogradContext *ctx, const Tensor &x, const Tensor &sh,
                        const Tensor &w, const Tensor &windex, const Tensor &src, const Tensor &dst, int64_t n,
                        const Tensor &groups, const Tensor &kpath, const Tensor &cg) {
    at::AutoDispatchBelowADInplaceOrView guard;
    Tensor out = tp_scatter_forward(x, sh, w, windex, src, dst, n, groups, kpath, cg);
    ctx->save_for_backward({x.contiguous(), sh.contiguous(), w.contiguous(), windex.contiguous(),
                            src.contiguous(), dst.contiguous(), groups, kpath.contiguous(), cg.contiguous()});
    ctx->saved_data["n"] = n;
    return out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext *ctx,
                                                 torch::autograd::variable_list grads) {
    TORCH_CHECK(!torch::GradMode::is_enabled(),
                "equiforce::tp_scatter has no second derivative (create_graph=True). Train on forces through "
                "model.use_fused_kernels(True, double_backward=True) (the training default on the CPU) or "
                "the PyTorch path (model.use_fused_kernels(False)); for second derivatives of an exported "
                "file, export it with `equiforce export --portable`");
    auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &sh = saved[1], &w = saved[2], &windex = saved[3], &src = saved[4],
                 &dst = saved[5], &groups = saved[6], &kpath = saved[7], &cg = saved[8];
    const int64_t n = ctx->saved_data["n"].toInt();
    Tensor gout = grads[0].contiguous();
    const bool need_x = ctx->needs_input_grad(0), need_sh = ctx->needs_input_grad(1),
               need_w = ctx->needs_input_grad(2);
    Inputs in = check_inputs(x, sh, w, windex, src, dst, n, groups, kpath, cg);
    TORCH_CHECK(gout.dim() == 2 && gout.size(0) == n && gout.size(1) == in.dout &&
                    gout.scalar_type() == x.scalar_type(),
                "equiforce::tp_scatter: unexpected output gradient ", gout.sizes());
    std::vector<Tensor> g;
    if (x.scalar_type() == torch::kFloat64)
      g = backward_impl<double>(in, x, sh, w, windex, src, dst, n, cg, gout, need_x, need_sh, need_w);
    else
      g = backward_impl<float>(in, x, sh, w, windex, src, dst, n, cg, gout, need_x, need_sh, need_w);
    return {g[0], g[1], g[2], Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

Tensor tp_scatter_autograd(const Tensor &x, const Tensor &sh, const Tensor &w, const Tensor &windex,
                           const Tensor &src, const Tensor &dst, int64_t n, const Tensor &groups,
                           const Tensor &kpath, const Tensor &cg) {
  return TpScatter::apply(x, sh, w, windex, src, dst, n, groups, kpath, cg);
}

// Reverse edges: e (j -> i, vector v) and f (i -> j, vector exactly -v) see the same distance, so
// their radial weights are equal and computed once. Returns (reps [U], index [E]): the edges whose
// radial weights are computed, and for every edge the row of `reps` it takes its weights from.
// An edge is paired only when its reverse is unique and the relation is mutual (duplicated edges,
// or several images of one pair with equal vectors, stay unpaired: always exact, never ambiguous).
template <typename T>
void pair_edges(const int64_t *dst, const int64_t *src, const T *v, int64_t e, int64_t n, int64_t *partner) {
  std::vector<int64_t> ptr, order;
  Tensor dst_t = torch::from_blob(const_cast<int64_t *>(dst), {e}, torch::kInt64);
  group_edges(dst_t, n, "edge_index[0]", ptr, order, "equiforce::radial_pairs");
  at::parallel_for(0, e, 1024, [&](int64_t b, int64_t end) {
    for (int64_t a = b; a < end; ++a) {
      const int64_t i = dst[a], j = src[a];
      TORCH_CHECK(j >= 0 && j < n, "equiforce::radial_pairs: edge_index[1] index ", j, " of edge ", a,
                  " is outside [0, ", n, ")");
      int64_t found = -1, count = 0;
      for (int64_t q = ptr[j]; q < ptr[j + 1]; ++q) {  // edges into j: candidates i -> j
        const int64_t f = order[q];
        if (src[f] == i && f != a && v[3 * f] == -v[3 * a] && v[3 * f + 1] == -v[3 * a + 1] &&
            v[3 * f + 2] == -v[3 * a + 2]) {
          found = f;
          ++count;
        }
      }
      partner[a] = count == 1 ? found : -1;
    }
  });
}

std::tuple<Tensor, Tensor> radial_pairs(const Tensor &edge_index_, const Tensor &edge_vec_, int64_t n) {
  TORCH_CHECK(edge_index_.dim() == 2 && edge_index_.size(0) == 2 && edge_index_.scalar_type() == torch::kInt64,
              "equiforce::radial_pairs: edge_index must be int64 [2, E]");
  const int64_t e = edge_index_.size(1);
  TORCH_CHECK(edge_vec_.dim() == 2 && edge_vec_.size(0) == e && edge_vec_.size(1) == 3,
              "equiforce::radial_pairs: edge_vec must be [E, 3] with E = ", e);
  TORCH_CHECK(edge_vec_.device().is_cpu() && edge_index_.device().is_cpu(), "equiforce::radial_pairs: CPU only");
  Tensor ei = edge_index_.contiguous(), v = edge_vec_.contiguous();
  std::vector<int64_t> partner(e);
  if (v.scalar_type() == torch::kFloat64)
    pair_edges<double>(ei.data_ptr<int64_t>(), ei.data_ptr<int64_t>() + e, v.data_ptr<double>(), e, n,
                       partner.data());
  else if (v.scalar_type() == torch::kFloat32)
    pair_edges<float>(ei.data_ptr<int64_t>(), ei.data_ptr<int64_t>() + e, v.data_ptr<float>(), e, n,
                      partner.data());
  else
    TORCH_CHECK(false, "equiforce::radial_pairs: edge_vec must be float32 or float64");
  // keep mutual pairs only (one pass: a member of a mutual pair is never cleared)
  for (int64_t a = 0; a < e; ++a)
    if (partner[a] >= 0 && partner[partner[a]] != a) partner[a] = -1;
  Tensor index = torch::empty({e}, ei.options());
  int64_t *idx = index.data_ptr<int64_t>();
  int64_t u = 0;
  for (int64_t a = 0; a < e; ++a)
    if (partner[a] < 0 || a < partner[a]) idx[a] = u++;
  Tensor reps = torch::empty({u}, ei.options());
  int64_t *r = reps.data_ptr<int64_t>();
  for (int64_t a = 0; a < e; ++a) {
    if (partner[a] < 0 || a < partner[a])
      r[idx[a]] = a;
    else
      idx[a] = idx[partner[a]];  // partner < a: already numbered
  }
  return {reps, index};
}

}  // namespace

TORCH_LIBRARY(equiforce, m) {
  m.def("tp_scatter(Tensor x, Tensor sh, Tensor w, Tensor windex, Tensor src, Tensor dst, int n, "
        "Tensor groups, Tensor kpath, Tensor cg) -> Tensor");
  m.def("tp_scatter_backward(Tensor x, Tensor sh, Tensor w, Tensor windex, Tensor src, Tensor dst, int n, "
        "Tensor groups, Tensor kpath, Tensor cg, Tensor gout, bool need_x, bool need_sh, bool need_w) "
        "-> Tensor[]");
  m.def("radial_pairs(Tensor edge_index, Tensor edge_vec, int n) -> (Tensor, Tensor)");
  // the instruction set of the tp_scatter bodies in use: "avx512", "avx2" or "sse2"
  m.def("cpu_isa() -> str", cpu_isa);
}

TORCH_LIBRARY_IMPL(equiforce, CPU, m) {
  m.impl("tp_scatter", tp_scatter_forward);
  m.impl("tp_scatter_backward", tp_scatter_backward);
  m.impl("radial_pairs", radial_pairs);
}

TORCH_LIBRARY_IMPL(equiforce, Autograd, m) { m.impl("tp_scatter", tp_scatter_autograd); }
