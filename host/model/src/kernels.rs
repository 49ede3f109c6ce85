//! Weight products on the CPU: rows of f32 activations times a weight matrix held
//! in f32, f16 or bf16, summed in f32.
//!
//! What they replace: candle's CPU matmul (the gemm crate). With one row of
//! activations gemm computes a gemv on one thread, with AVX2 even where the CPU
//! has AVX-512; at batch 1 on the embedded model that gemv was half of a decode
//! step (a `perf` profile of `kframe bench peer --kframe-only`: 37% of samples in
//! the vocabulary projection, 17% in the layers' projections). gemm also wants
//! both operands in one dtype, so half-precision weights would mean
//! half-precision activations. These kernels split the output columns over the
//! compute threads, widen half-precision weights to f32 as they load them
//! (exactly: every f16 and bf16 value is an f32 value), and use AVX-512F (else
//! AVX2 + FMA + F16C, else plain Rust), chosen at run time.
//!
//! Two forms, for the two ways kframe stores weights:
//!
//! - [`rows_product`]: W row-major (n, k), `out = x W^T` (the vocabulary
//!   projection reads the embedding matrix this way);
//! - [`cols_product`]: W^T row-major (k, n), `out = x W^T` (the layers keep W^T,
//!   see `qwen2::Proj`).
//!
//! Both work in register blocks of up to [`BLOCK_ROWS`] activation rows (as many
//! as are left, so one row costs one row's arithmetic): every weight vector loaded
//! serves each row of the block. From `WIDE_ROWS` (8) rows on AVX-512 the rows form
//! switches to a wide form that transposes the activations once and never
//! reduces across lanes.
//!
//! Rounding: each output is one f32 sum of k products of f32 values, in lanes of
//! the vector width and then reduced across lanes; gemm also sums in f32, in its
//! own order, so the two differ by rounding only (the bound is tested).

use candle_core::{DType, Storage, Tensor};
use half::{bf16, f16};
use rayon::prelude::*;

/// Below this many weight bytes a product runs on the calling thread. Splitting
/// even small products pays in a decode step: the second thread stays awake
/// between them instead of going to sleep and being woken (futex calls were 18%
/// of a batch-1 profile). On the embedded model with f16 weights, two runs each of
/// `kframe bench peer --kframe-only` at batch 1: 2600 - 2690 tok/s with the line
/// at 512 KiB (its MLP and attention products then ran on one thread), 2850 - 3260
/// at 128 KiB, 3020 - 3210 at 16 KiB (every product split); one thread for
/// everything, 2360 - 2390.
const PARALLEL_BYTES: usize = 16 * 1024;

/// Activation rows one register block takes.
pub const BLOCK_ROWS: usize = 4;

/// f32 weights with more activation rows than this go to gemm, whose packing pays
/// back over many rows; half-precision weights always come here (gemm would
/// need the activations in half precision too).
pub const MAX_F32_ROWS: usize = 4;

/// The instruction sets a kernel can use, best first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Isa {
    #[cfg(target_arch = "x86_64")]
    Avx512,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    Portable,
}

fn isa() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return Isa::Avx512;
        }
        if std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
        {
            return Isa::Avx2;
        }
    }
    Isa::Portable
}

/// A weight element type: f32, f16 or bf16.
pub trait Weight: Copy + Send + Sync + 'static {
    fn to_f32(self) -> f32;
}

impl Weight for f32 {
    fn to_f32(self) -> f32 {
        self
    }
}

impl Weight for f16 {
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
}

impl Weight for bf16 {
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
}

/// How a weight tensor holds W.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    /// W itself, (n, k): [`rows_product`].
    Rows,
    /// W^T, (k, n): [`cols_product`].
    Cols,
}

/// `x W^T` for x (b, k) and a weight tensor in `form`, as an f32 tensor (b, n),
/// when these kernels take the product: x f32 and W f32, f16 or bf16, both on the
/// CPU, W contiguous, and (for f32 W) b <= [`MAX_F32_ROWS`]. None otherwise (the
/// caller uses candle's matmul).
pub fn product(x: &Tensor, w: &Tensor, form: Form) -> candle_core::Result<Option<Tensor>> {
    let (b, k) = x.dims2()?;
    let rows_ok = match w.dtype() {
        DType::F32 => b <= MAX_F32_ROWS,
        DType::F16 | DType::BF16 => true,
        _ => false,
    };
    if !rows_ok || !x.device().is_cpu() || x.dtype() != DType::F32 {
        return Ok(None);
    }
    let n = match (form, w.dims2()?) {
        (Form::Rows, (n, wk)) if wk == k => n,
        (Form::Cols, (wk, n)) if wk == k => n,
        _ => candle_core::bail!("a product of x {:?} with W {:?} ({form:?})", x.dims(), w.dims()),
    };
    let xs = x.flatten_all()?.to_vec1::<f32>()?;
    let (storage, layout) = w.storage_and_layout();
    let (Storage::Cpu(cpu), Some((from, to))) = (&*storage, layout.contiguous_offsets()) else {
        return Ok(None);
    };
    let mut out = vec![0f32; b * n];
    fn run<W: Weight>(form: Form, xs: &[f32], b: usize, k: usize, w: &[W], n: usize, out: &mut [f32]) {
        match form {
            Form::Rows => rows_product(xs, b, k, w, n, out),
            Form::Cols => cols_product(xs, b, k, w, n, out),
        }
    }
    match w.dtype() {
        DType::F32 => run(form, &xs, b, k, &cpu.as_slice::<f32>()?[from..to], n, &mut out),
        DType::F16 => run(form, &xs, b, k, &cpu.as_slice::<f16>()?[from..to], n, &mut out),
        DType::BF16 => run(form, &xs, b, k, &cpu.as_slice::<bf16>()?[from..to], n, &mut out),
        _ => unreachable!("checked above"),
    }
    drop(storage);
    Ok(Some(Tensor::from_vec(out, (b, n), x.device())?))
}

/// `out (b, n) = x (b, k) W^T` for W row-major (n, k).
pub fn rows_product<W: Weight>(x: &[f32], b: usize, k: usize, w: &[W], n: usize, out: &mut [f32]) {
    assert!(x.len() == b * k && w.len() == n * k && out.len() == b * n);
    let isa = isa();
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512 && b >= WIDE_ROWS {
        return rows_product_wide(x, b, k, w, n, out);
    }
    // Each thread takes a range of weight rows (output columns), four at a time.
    split(n, 4, n * k * size_of::<W>(), out, |c0, c1, out| {
        for r0 in (c0..c1).step_by(4) {
            let rows = (c1 - r0).min(4);
            // A ragged block repeats its last weight row; the repeats are not written.
            let wr: [&[W]; 4] = std::array::from_fn(|q| {
                let r = r0 + q.min(rows - 1);
                &w[r * k..(r + 1) * k]
            });
            for i0 in (0..b).step_by(BLOCK_ROWS) {
                let put = |dots: &[[f32; 4]]| {
                    for (bi, dots) in dots.iter().enumerate() {
                        for (q, &v) in dots.iter().enumerate().take(rows) {
                            out.set(i0 + bi, r0 + q, v);
                        }
                    }
                };
                // A block of as many rows as are left, so that one row costs
                // one row's arithmetic.
                match b - i0 {
                    1 => put(&dots::<W, 1>(isa, block(x, k, i0), wr, k)),
                    2 => put(&dots::<W, 2>(isa, block(x, k, i0), wr, k)),
                    3 => put(&dots::<W, 3>(isa, block(x, k, i0), wr, k)),
                    _ => put(&dots::<W, 4>(isa, block(x, k, i0), wr, k)),
                }
            }
        }
    });
}

/// From this many activation rows [`rows_product`] takes the wide form on
/// AVX-512: the dot-product form reduces each of its 16 accumulators across
/// lanes at the end of every 4 x 4 block, which at k = 256 costs about half as
/// many instructions as the block's FMAs.
#[cfg(target_arch = "x86_64")]
const WIDE_ROWS: usize = 8;

/// [`rows_product`] for many activation rows, as `out^T = W x^T`: x is
/// transposed once to (k, b) (b padded to [`x86::WIDE_LANES`]), and each weight
/// is broadcast against a vector of 16 rows' activations, so accumulators hold
/// finished sums and are never reduced across lanes.
#[cfg(target_arch = "x86_64")]
fn rows_product_wide<W: Weight>(x: &[f32], b: usize, k: usize, w: &[W], n: usize, out: &mut [f32]) {
    let bp = b.div_ceil(x86::WIDE_LANES) * x86::WIDE_LANES;
    let mut xt = vec![0f32; k * bp];
    for (i, row) in x.chunks_exact(k).enumerate() {
        for (j, &v) in row.iter().enumerate() {
            xt[j * bp + i] = v;
        }
    }
    let rows = x86::WIDE_WEIGHT_ROWS;
    split(n, rows, n * k * size_of::<W>(), out, |c0, c1, out| {
        let mut sums = vec![0f32; rows * x86::WIDE_LANES];
        for r0 in (c0..c1).step_by(rows) {
            let live = (c1 - r0).min(rows);
            let wr: [&[W]; x86::WIDE_WEIGHT_ROWS] = std::array::from_fn(|q| {
                let r = r0 + q.min(live - 1);
                &w[r * k..(r + 1) * k]
            });
            for i0 in (0..bp).step_by(x86::WIDE_LANES) {
                // SAFETY: AVX-512F was detected (the caller checks); xt holds k rows
                // of bp columns and i0 + WIDE_LANES <= bp.
                unsafe { x86::wide_block(&xt, bp, i0, wr, k, &mut sums) };
                for q in 0..live {
                    for (li, &v) in sums[q * x86::WIDE_LANES..][..x86::WIDE_LANES].iter().enumerate() {
                        if i0 + li < b {
                            out.set(i0 + li, r0 + q, v);
                        }
                    }
                }
            }
        }
    });
}

/// `out (b, n) = x (b, k) Wt` for Wt row-major (k, n).
pub fn cols_product<W: Weight>(x: &[f32], b: usize, k: usize, wt: &[W], n: usize, out: &mut [f32]) {
    assert!(x.len() == b * k && wt.len() == k * n && out.len() == b * n);
    let isa = isa();
    split(n, 64, n * k * size_of::<W>(), out, |c0, c1, out| {
        // Tiles of 64 columns: a tile's weights (k x 64) stay in L1 or L2 while
        // every block of rows passes over them.
        #[allow(clippy::too_many_arguments)]
        fn tile<W: Weight, const R: usize>(
            isa: Isa,
            x: &[f32],
            k: usize,
            i0: usize,
            wt: &[W],
            n: usize,
            t0: usize,
            width: usize,
            out: Out,
        ) {
            let mut acc = [[0f32; 64]; R];
            axpy::<W, R>(isa, block(x, k, i0), wt, n, t0, width, &mut acc);
            for (bi, a) in acc.iter().enumerate() {
                for (c, &v) in a[..width].iter().enumerate() {
                    out.set(i0 + bi, t0 + c, v);
                }
            }
        }
        for t0 in (c0..c1).step_by(64) {
            let width = (c1 - t0).min(64);
            for i0 in (0..b).step_by(BLOCK_ROWS) {
                // As many rows as are left (see `rows_product`).
                match b - i0 {
                    1 => tile::<W, 1>(isa, x, k, i0, wt, n, t0, width, out),
                    2 => tile::<W, 2>(isa, x, k, i0, wt, n, t0, width, out),
                    3 => tile::<W, 3>(isa, x, k, i0, wt, n, t0, width, out),
                    _ => tile::<W, 4>(isa, x, k, i0, wt, n, t0, width, out),
                }
            }
        }
    });
}

/// Rows i0..i0 + R of x (rows of k).
fn block<const R: usize>(x: &[f32], k: usize, i0: usize) -> [&[f32]; R] {
    std::array::from_fn(|q| &x[(i0 + q) * k..(i0 + q + 1) * k])
}

/// The output matrix (b, n), written by several threads at once, each to its own
/// columns.
#[derive(Clone, Copy)]
pub(crate) struct Out {
    ptr: *mut f32,
    n: usize,
    len: usize,
}

// SAFETY: `split` hands each thread a disjoint range of columns, and `set` writes
// only inside the range it was given.
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

impl Out {
    pub(crate) fn set(&self, row: usize, col: usize, v: f32) {
        let at = row * self.n + col;
        assert!(at < self.len && col < self.n);
        // SAFETY: in bounds (checked), and no other thread writes this column.
        unsafe { *self.ptr.add(at) = v }
    }
}

/// Runs `work(c0, c1, out)` over column ranges of `n` (multiples of `align`), on
/// the compute threads when the product is large enough; `work` writes only the
/// columns c0..c1 of `out`.
pub(crate) fn split(n: usize, align: usize, bytes: usize, out: &mut [f32], work: impl Fn(usize, usize, Out) + Sync) {
    let target = Out { ptr: out.as_mut_ptr(), n, len: out.len() };
    let threads = if bytes >= PARALLEL_BYTES { rayon::current_num_threads().max(1) } else { 1 };
    if threads == 1 {
        return work(0, n, target);
    }
    let per = n.div_ceil(threads).div_ceil(align) * align;
    (0..n.div_ceil(per)).into_par_iter().for_each(|t| work(t * per, ((t + 1) * per).min(n), target));
}

/// dots[i][q] = sum_j x[i][j] * w[q][j]: four activation rows by four weight rows.
fn dots<W: Weight, const R: usize>(isa: Isa, x: [&[f32]; R], w: [&[W]; 4], k: usize) -> [[f32; 4]; R] {
    match isa {
        // SAFETY: the features were detected at run time; every row holds k values.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { x86::dots_avx512(x, w, k) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { x86::dots_avx2(x, w, k) },
        Isa::Portable => std::array::from_fn(|i| {
            std::array::from_fn(|q| x[i][..k].iter().zip(&w[q][..k]).map(|(a, b)| a * b.to_f32()).sum())
        }),
    }
}

/// acc[i][c] += sum_j x[i][j] * wt[j * n + c0 + c] for c < width <= 64.
fn axpy<W: Weight, const R: usize>(
    isa: Isa,
    x: [&[f32]; R],
    wt: &[W],
    n: usize,
    c0: usize,
    width: usize,
    acc: &mut [[f32; 64]; R],
) {
    let k = x[0].len();
    assert!(width <= 64 && c0 + width <= n && wt.len() >= k * n);
    match isa {
        // SAFETY: the features were detected at run time; the bounds are checked.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { x86::axpy_avx512(x, wt, n, c0, width, acc) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { x86::axpy_avx2(x, wt, n, c0, width, acc) },
        Isa::Portable => axpy_portable(x, wt, n, c0, 0, width, acc),
    }
}

/// [`axpy`] for columns from..width, in plain Rust (the SIMD kernels' tails).
fn axpy_portable<W: Weight, const R: usize>(
    x: [&[f32]; R],
    wt: &[W],
    n: usize,
    c0: usize,
    from: usize,
    width: usize,
    acc: &mut [[f32; 64]; R],
) {
    for j in 0..x[0].len() {
        let row = &wt[j * n + c0..j * n + c0 + width];
        for (a, x) in acc.iter_mut().zip(x) {
            for c in from..width {
                a[c] += x[j] * row[c].to_f32();
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! The SIMD kernels. Weights are widened to f32 by the load: f16 with
    //! vcvtph2ps, bf16 by shifting its bits into the top half of an f32.
    use super::{axpy_portable, Weight};
    use half::{bf16, f16};
    use std::any::TypeId;
    use std::arch::x86_64::*;

    #[derive(Clone, Copy)]
    enum Kind {
        F32,
        F16,
        Bf16,
    }

    fn kind<W: Weight>() -> Kind {
        let t = TypeId::of::<W>();
        if t == TypeId::of::<f16>() {
            Kind::F16
        } else if t == TypeId::of::<bf16>() {
            Kind::Bf16
        } else {
            assert_eq!(t, TypeId::of::<f32>(), "a weight type the kernels do not know");
            Kind::F32
        }
    }

    /// 16 weights from `p` as f32.
    #[target_feature(enable = "avx512f")]
    unsafe fn load16<W: Weight>(kind: Kind, p: *const W) -> __m512 {
        match kind {
            Kind::F32 => _mm512_loadu_ps(p as *const f32),
            Kind::F16 => _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)),
            Kind::Bf16 => _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(_mm256_loadu_si256(
                p as *const __m256i,
            )))),
        }
    }

    /// 8 weights from `p` as f32.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8<W: Weight>(kind: Kind, p: *const W) -> __m256 {
        match kind {
            Kind::F32 => _mm256_loadu_ps(p as *const f32),
            Kind::F16 => _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)),
            Kind::Bf16 => _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(_mm_loadu_si128(
                p as *const __m128i,
            )))),
        }
    }

    /// Activation rows per block of the wide form: two registers.
    pub const WIDE_LANES: usize = 32;
    /// Weight rows per block of the wide form: with two registers each, sixteen
    /// accumulators.
    pub const WIDE_WEIGHT_ROWS: usize = 8;

    /// sums[q * 32 + l] = sum_j w[q][j] * xt[j * bp + i0 + l]: eight weight rows by
    /// the 32 activation rows i0.. of x transposed (k, bp).
    #[target_feature(enable = "avx512f")]
    pub unsafe fn wide_block<W: Weight>(
        xt: &[f32],
        bp: usize,
        i0: usize,
        w: [&[W]; WIDE_WEIGHT_ROWS],
        k: usize,
        sums: &mut [f32],
    ) {
        let kind = kind::<W>();
        assert!(xt.len() >= k * bp && i0 + WIDE_LANES <= bp && sums.len() >= WIDE_WEIGHT_ROWS * WIDE_LANES);
        assert!(w.iter().all(|r| r.len() >= k));
        let mut acc = [[_mm512_setzero_ps(); 2]; WIDE_WEIGHT_ROWS];
        // Each weight row's next 16 values widened to f32, to broadcast from.
        let mut widened = [[0f32; 16]; WIDE_WEIGHT_ROWS];
        let px = xt.as_ptr().add(i0);
        let mut j = 0;
        while j < k {
            let span = (k - j).min(16);
            for (q, row) in widened.iter_mut().enumerate() {
                if span == 16 {
                    _mm512_storeu_ps(row.as_mut_ptr(), load16(kind, w[q].as_ptr().add(j)));
                } else {
                    for (t, v) in row.iter_mut().enumerate() {
                        *v = if t < span { w[q][j + t].to_f32() } else { 0.0 };
                    }
                }
            }
            for t in 0..span {
                let xrow = px.add((j + t) * bp);
                let (x0, x1) = (_mm512_loadu_ps(xrow), _mm512_loadu_ps(xrow.add(16)));
                for (acc, row) in acc.iter_mut().zip(&widened) {
                    let wv = _mm512_set1_ps(row[t]);
                    acc[0] = _mm512_fmadd_ps(wv, x0, acc[0]);
                    acc[1] = _mm512_fmadd_ps(wv, x1, acc[1]);
                }
            }
            j += span;
        }
        for (q, acc) in acc.iter().enumerate() {
            _mm512_storeu_ps(sums.as_mut_ptr().add(q * WIDE_LANES), acc[0]);
            _mm512_storeu_ps(sums.as_mut_ptr().add(q * WIDE_LANES + 16), acc[1]);
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn sum8(v: __m256) -> f32 {
        let half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let half = _mm_add_ps(half, _mm_movehl_ps(half, half));
        _mm_cvtss_f32(_mm_add_ss(half, _mm_shuffle_ps(half, half, 1)))
    }

    /// R x 4 accumulators (R activation rows by four weight rows, at most
    /// sixteen) of 16 lanes; each loaded weight vector serves R products. The
    /// tail is scalar. The AVX2 version below is the same loop at 8 lanes.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn dots_avx512<W: Weight, const R: usize>(x: [&[f32]; R], w: [&[W]; 4], k: usize) -> [[f32; 4]; R] {
        let kind = kind::<W>();
        assert!(x.iter().all(|r| r.len() >= k) && w.iter().all(|r| r.len() >= k));
        let mut acc = [[_mm512_setzero_ps(); 4]; R];
        let mut j = 0;
        while j + 16 <= k {
            let wv: [__m512; 4] = std::array::from_fn(|q| load16(kind, w[q].as_ptr().add(j)));
            for (i, acc) in acc.iter_mut().enumerate() {
                let xv = _mm512_loadu_ps(x[i].as_ptr().add(j));
                for (q, a) in acc.iter_mut().enumerate() {
                    *a = _mm512_fmadd_ps(xv, wv[q], *a);
                }
            }
            j += 16;
        }
        std::array::from_fn(|i| {
            std::array::from_fn(|q| {
                let mut s = _mm512_reduce_add_ps(acc[i][q]);
                for t in j..k {
                    s += x[i][t] * w[q][t].to_f32();
                }
                s
            })
        })
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dots_avx2<W: Weight, const R: usize>(x: [&[f32]; R], w: [&[W]; 4], k: usize) -> [[f32; 4]; R] {
        let kind = kind::<W>();
        assert!(x.iter().all(|r| r.len() >= k) && w.iter().all(|r| r.len() >= k));
        let mut acc = [[_mm256_setzero_ps(); 4]; R];
        let mut j = 0;
        while j + 8 <= k {
            let wv: [__m256; 4] = std::array::from_fn(|q| load8(kind, w[q].as_ptr().add(j)));
            for (i, acc) in acc.iter_mut().enumerate() {
                let xv = _mm256_loadu_ps(x[i].as_ptr().add(j));
                for (q, a) in acc.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(xv, wv[q], *a);
                }
            }
            j += 8;
        }
        std::array::from_fn(|i| {
            std::array::from_fn(|q| {
                let mut s = sum8(acc[i][q]);
                for t in j..k {
                    s += x[i][t] * w[q][t].to_f32();
                }
                s
            })
        })
    }

    /// Columns in blocks of 64 (four registers per row, sixteen accumulators),
    /// then 16, then one at a time.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn axpy_avx512<W: Weight, const R: usize>(
        x: [&[f32]; R],
        wt: &[W],
        n: usize,
        c0: usize,
        width: usize,
        acc: &mut [[f32; 64]; R],
    ) {
        let kind = kind::<W>();
        let k = x[0].len();
        let pw = wt.as_ptr();
        let mut c = 0;
        while c + 64 <= width {
            let mut v = [[_mm512_setzero_ps(); 4]; R];
            for j in 0..k {
                let row = pw.add(j * n + c0 + c);
                let wv: [__m512; 4] = std::array::from_fn(|q| load16(kind, row.add(16 * q)));
                for (i, v) in v.iter_mut().enumerate() {
                    let xb = _mm512_set1_ps(*x[i].get_unchecked(j));
                    for (q, v) in v.iter_mut().enumerate() {
                        *v = _mm512_fmadd_ps(xb, wv[q], *v);
                    }
                }
            }
            for (a, v) in acc.iter_mut().zip(&v) {
                for (q, v) in v.iter().enumerate() {
                    let p = a.as_mut_ptr().add(c + 16 * q);
                    _mm512_storeu_ps(p, _mm512_add_ps(_mm512_loadu_ps(p), *v));
                }
            }
            c += 64;
        }
        while c + 16 <= width {
            let mut v = [_mm512_setzero_ps(); R];
            for j in 0..k {
                let wv = load16(kind, pw.add(j * n + c0 + c));
                for (i, v) in v.iter_mut().enumerate() {
                    *v = _mm512_fmadd_ps(_mm512_set1_ps(*x[i].get_unchecked(j)), wv, *v);
                }
            }
            for (a, v) in acc.iter_mut().zip(&v) {
                let p = a.as_mut_ptr().add(c);
                _mm512_storeu_ps(p, _mm512_add_ps(_mm512_loadu_ps(p), *v));
            }
            c += 16;
        }
        axpy_portable(x, wt, n, c0, c, width, acc);
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn axpy_avx2<W: Weight, const R: usize>(
        x: [&[f32]; R],
        wt: &[W],
        n: usize,
        c0: usize,
        width: usize,
        acc: &mut [[f32; 64]; R],
    ) {
        let kind = kind::<W>();
        let k = x[0].len();
        let pw = wt.as_ptr();
        let mut c = 0;
        // Two registers per row: eight accumulators, of the sixteen AVX2 has.
        while c + 16 <= width {
            let mut v = [[_mm256_setzero_ps(); 2]; R];
            for j in 0..k {
                let row = pw.add(j * n + c0 + c);
                let wv = [load8(kind, row), load8(kind, row.add(8))];
                for (i, v) in v.iter_mut().enumerate() {
                    let xb = _mm256_set1_ps(*x[i].get_unchecked(j));
                    for (q, v) in v.iter_mut().enumerate() {
                        *v = _mm256_fmadd_ps(xb, wv[q], *v);
                    }
                }
            }
            for (a, v) in acc.iter_mut().zip(&v) {
                for (q, v) in v.iter().enumerate() {
                    let p = a.as_mut_ptr().add(c + 8 * q);
                    _mm256_storeu_ps(p, _mm256_add_ps(_mm256_loadu_ps(p), *v));
                }
            }
            c += 16;
        }
        axpy_portable(x, wt, n, c0, c, width, acc);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9e3779b97f4a7c15) | 1;
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
            })
            .collect()
    }

    /// f64 reference and the f32 bound: a sum of k products in any order is within
    /// about k * 2^-24 * sum |x w| of the exact value (plus one rounding of each
    /// product). The weights are taken as the f32 values the kernels widen them to.
    fn check(x: &[f32], b: usize, k: usize, n: usize, w_at: impl Fn(usize, usize) -> f32, got: &[f32]) {
        for i in 0..b {
            for c in 0..n {
                let (mut exact, mut mag) = (0f64, 0f64);
                for j in 0..k {
                    let p = x[i * k + j] as f64 * w_at(j, c) as f64;
                    exact += p;
                    mag += p.abs();
                }
                let bound = (k as f64 + 2.0) * f32::EPSILON as f64 / 2.0 * mag;
                let err = (got[i * n + c] as f64 - exact).abs();
                assert!(err <= bound, "row {i} column {c}: error {err} over bound {bound}");
            }
        }
    }

    /// Shapes with tails at every vector width and register block, and ones large
    /// enough to split over threads; row counts with ragged blocks.
    const SHAPES: [(usize, usize); 5] = [(256, 11), (37, 129), (1, 3), (256, 1200), (512, 640)];
    const ROWS: [usize; 7] = [1, 2, 3, 4, 5, 9, 33];

    fn rows_case<W: Weight>(convert: fn(f32) -> W) {
        for &(k, n) in &SHAPES {
            for b in ROWS {
                let x = random(b * k, 1);
                let w: Vec<W> = random(n * k, 2).into_iter().map(convert).collect();
                let mut out = vec![0f32; b * n];
                rows_product(&x, b, k, &w, n, &mut out);
                check(&x, b, k, n, |j, c| w[c * k + j].to_f32(), &out);
            }
        }
    }

    fn cols_case<W: Weight>(convert: fn(f32) -> W) {
        for &(k, n) in &SHAPES {
            for b in ROWS {
                let x = random(b * k, 3);
                let wt: Vec<W> = random(k * n, 4).into_iter().map(convert).collect();
                let mut out = vec![0f32; b * n];
                cols_product(&x, b, k, &wt, n, &mut out);
                check(&x, b, k, n, |j, c| wt[j * n + c].to_f32(), &out);
            }
        }
    }

    #[test]
    fn rows_product_matches_an_f64_reference_for_f32_f16_and_bf16_weights_on_ragged_shapes() {
        rows_case(|v| v);
        rows_case(f16::from_f32);
        rows_case(bf16::from_f32);
    }

    #[test]
    fn cols_product_matches_an_f64_reference_for_f32_f16_and_bf16_weights_on_ragged_shapes() {
        cols_case(|v| v);
        cols_case(f16::from_f32);
        cols_case(bf16::from_f32);
    }

    /// The instruction sets this CPU can run, so that each kernel variant is
    /// tested, not only the one [`isa`] picks.
    fn available() -> Vec<Isa> {
        let mut all = vec![Isa::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
                && std::arch::is_x86_feature_detected!("f16c")
            {
                all.push(Isa::Avx2);
            }
            if std::arch::is_x86_feature_detected!("avx512f") {
                all.push(Isa::Avx512);
            }
        }
        all
    }

    fn every_isa_case<W: Weight>(convert: fn(f32) -> W) {
        // k with a tail at every width; n - 7 columns from column 7 (an unaligned
        // start) hold a 64-block, 16-blocks and a scalar tail.
        let (k, n) = (300, 150);
        let x = random(4 * k, 5);
        let w: Vec<W> = random(n * k, 6).into_iter().map(convert).collect();
        let xr: [&[f32]; 4] = std::array::from_fn(|i| &x[i * k..(i + 1) * k]);
        for isa in available() {
            let mut got = vec![0f32; 4 * n];
            for r0 in (0..n).step_by(4) {
                let wr: [&[W]; 4] = std::array::from_fn(|q| {
                    let r = (r0 + q).min(n - 1);
                    &w[r * k..(r + 1) * k]
                });
                let d = dots(isa, xr, wr, k);
                for (i, d) in d.iter().enumerate() {
                    for (q, v) in d.iter().enumerate().take((n - r0).min(4)) {
                        got[i * n + r0 + q] = *v;
                    }
                }
            }
            check(&x, 4, k, n, |j, c| w[c * k + j].to_f32(), &got);
            // One and three rows: the blocks a ragged batch ends with.
            let one = dots(isa, [xr[0]], [&w[..k], &w[k..2 * k], &w[2 * k..3 * k], &w[3 * k..4 * k]], k);
            let three =
                dots(isa, [xr[0], xr[1], xr[2]], [&w[..k], &w[k..2 * k], &w[2 * k..3 * k], &w[3 * k..4 * k]], k);
            for (i, row) in three.iter().chain(&one).enumerate() {
                check(&x[(i % 3) * k..], 1, k, 4, |j, c| w[c * k + j].to_f32(), row);
            }
            // w read as Wt (k / 2, n): the first 150 of its 300 rows.
            let half = k / 2;
            let xh: Vec<f32> = (0..4).flat_map(|i| x[i * k..i * k + half].to_vec()).collect();
            let xr: [&[f32]; 4] = std::array::from_fn(|i| &xh[i * half..(i + 1) * half]);
            let width = (n - 7).min(64);
            let mut acc = [[0f32; 64]; 4];
            axpy(isa, xr, &w, n, 7, width, &mut acc);
            let flat: Vec<f32> = acc.iter().flat_map(|a| a[..width].to_vec()).collect();
            check(&xh, 4, half, width, |j, c| w[j * n + 7 + c].to_f32(), &flat);
            let mut acc = [[0f32; 64]; 4];
            axpy(isa, xr, &w, n, 100, 50, &mut acc);
            let flat: Vec<f32> = acc.iter().flat_map(|a| a[..50].to_vec()).collect();
            check(&xh, 4, half, 50, |j, c| w[j * n + 100 + c].to_f32(), &flat);
            let mut acc = [[0f32; 64]; 1];
            axpy(isa, [xr[0]], &w, n, 7, width, &mut acc);
            check(&xh, 1, half, width, |j, c| w[j * n + 7 + c].to_f32(), &acc[0][..width]);
        }
    }

    #[test]
    fn every_instruction_set_this_cpu_has_is_within_rounding_of_the_exact_products_for_each_weight_type() {
        every_isa_case(|v| v);
        every_isa_case(f16::from_f32);
        every_isa_case(bf16::from_f32);
    }
}
