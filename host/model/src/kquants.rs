//! Products with K-quant weights on the CPU: Q4_K and Q6_K, llama.cpp's blocks
//! of 256 values, read in place from the GGUF file's layout.
//!
//! What they replace: candle's quantized matmul for these two formats, at up
//! to [`MAX_ROWS`] activation rows (a decode step of a few sequences). On a CPU
//! with AVX-512 VNNI candle repacks each matrix on its first use into a tile
//! layout that keeps the block scales as f32, so a one-row product streams a
//! third more bytes than the blocks hold. These kernels read the blocks in
//! place, split the output rows over the compute threads (as [`crate::kernels`]
//! does), and use AVX2 + FMA + F16C where the CPU has them. Other formats,
//! devices and CPUs, and products of more rows, stay with candle, whose repacked
//! kernels win from about eight rows on; the repack, and the memory it doubles,
//! still happens once a product of that many rows (a prefill) has run.
//!
//! Arithmetic, as llama.cpp and candle do it: each activation row is quantized
//! to Q8_K (256 values to i8 with one f32 scale, and the sums of each 16), every
//! block's dot product is an exact integer sum, and only the per-block scaling is
//! in f32. The activations are quantized by candle's own rule, so the integers
//! are candle's; the f32 sums of the blocks run in another order, and the two
//! differ by f32 rounding of those few terms (the tests bound it).

use crate::kernels::{split, Out};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Tensor};
use half::f16;

/// Values in one K-quant block.
pub const QK: usize = 256;
const Q4K_BYTES: usize = 144;
const Q6K_BYTES: usize = 210;

/// One Q8_K block of an activation row.
#[derive(Clone)]
pub struct Q8K {
    pub d: f32,
    pub qs: [i8; QK],
    /// Sums of each 16 consecutive `qs`.
    pub bsums: [i16; QK / 16],
}

/// Quantizes `x` (a multiple of [`QK`] long) to Q8_K blocks, by candle's rule:
/// the value of largest magnitude maps to -127, the rest round to nearest.
pub fn quantize_q8k(x: &[f32]) -> Vec<Q8K> {
    x.chunks_exact(QK)
        .map(|xs| {
            let (mut max, mut amax) = (0f32, 0f32);
            for &v in xs {
                if amax < v.abs() {
                    amax = v.abs();
                    max = v;
                }
            }
            let mut y = Q8K { d: 0.0, qs: [0; QK], bsums: [0; QK / 16] };
            if amax > 0.0 {
                let iscale = -127f32 / max;
                for (q, &v) in y.qs.iter_mut().zip(xs) {
                    *q = (iscale * v).round().clamp(-128.0, 127.0) as i8;
                }
                for (s, chunk) in y.bsums.iter_mut().zip(y.qs.chunks_exact(16)) {
                    *s = chunk.iter().map(|&q| q as i16).sum();
                }
                y.d = 1.0 / iscale;
            }
            y
        })
        .collect()
}

/// The block formats these kernels take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Q4K,
    Q6K,
}

impl Format {
    pub fn of(dtype: GgmlDType) -> Option<Self> {
        match dtype {
            GgmlDType::Q4K => Some(Self::Q4K),
            GgmlDType::Q6K => Some(Self::Q6K),
            _ => None,
        }
    }

    fn block_bytes(self) -> usize {
        match self {
            Self::Q4K => Q4K_BYTES,
            Self::Q6K => Q6K_BYTES,
        }
    }
}

fn half(bytes: &[u8], at: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([bytes[at], bytes[at + 1]])).to_f32()
}

/// Q4_K's eight 6-bit scales and eight 6-bit mins, packed in 12 bytes, as two
/// words of four scales and two words of four mins (one byte each).
#[inline(always)]
fn q4k_unpack(packed: &[u8]) -> [u32; 4] {
    const LOW6: u32 = 0x3f3f3f3f;
    const LOW4: u32 = 0x0f0f0f0f;
    const LOW2: u32 = 0x03030303;
    let word = |i: usize| u32::from_le_bytes([packed[4 * i], packed[4 * i + 1], packed[4 * i + 2], packed[4 * i + 3]]);
    let (a, b, c) = (word(0), word(1), word(2));
    // Scales 0-3 and mins 0-3 are the low 6 bits of bytes 0-3 and 4-7; scales
    // and mins 4-7 take their low 4 bits from bytes 8-11 and their top 2 from
    // the top bits of bytes 0-3 and 4-7.
    [a & LOW6, (c & LOW4) | (((a >> 6) & LOW2) << 4), b & LOW6, ((c >> 4) & LOW4) | (((b >> 6) & LOW2) << 4)]
}

fn q4k_scales(packed: &[u8]) -> ([u8; 8], [u8; 8]) {
    let u = q4k_unpack(packed);
    let bytes = |lo: u32, hi: u32| {
        let (lo, hi) = (lo.to_le_bytes(), hi.to_le_bytes());
        [lo[0], lo[1], lo[2], lo[3], hi[0], hi[1], hi[2], hi[3]]
    };
    (bytes(u[0], u[1]), bytes(u[2], u[3]))
}

/// One Q4_K block's terms against one Q8_K block: the exact integer sums of
/// the scaled products and of the scaled mins, and the two f32 factors, so that
/// the block's dot is `d * sumi - dmin * summ`.
fn q4k_block_portable(w: &[u8], y: &Q8K) -> (f32, i32, f32, i32) {
    let (sc, m) = q4k_scales(&w[4..16]);
    let qs = &w[16..Q4K_BYTES];
    let mut sumi = 0i32;
    for j in 0..4 {
        let (mut lo, mut hi) = (0i32, 0i32);
        for l in 0..32 {
            lo += (qs[32 * j + l] & 0xF) as i32 * y.qs[64 * j + l] as i32;
            hi += (qs[32 * j + l] >> 4) as i32 * y.qs[64 * j + 32 + l] as i32;
        }
        sumi += sc[2 * j] as i32 * lo + sc[2 * j + 1] as i32 * hi;
    }
    let summ = (0..8).map(|s| m[s] as i32 * (y.bsums[2 * s] as i32 + y.bsums[2 * s + 1] as i32)).sum();
    (half(w, 0) * y.d, sumi, half(w, 2) * y.d, summ)
}

/// One Q6_K block's terms against one Q8_K block: `d * sumi`, where the 6-bit
/// values' offset of 32 is taken out through the Q8_K block sums.
fn q6k_block_portable(w: &[u8], y: &Q8K) -> (f32, i32) {
    let sc = |s: usize| (w[192 + s] as i8) as i32;
    let sumi: i32 = (0..QK).map(|e| sc(e / 16) * q6k_value(w, e) as i32 * y.qs[e] as i32).sum();
    let offset: i32 = (0..16).map(|s| sc(s) * y.bsums[s] as i32).sum();
    (half(w, 208) * y.d, sumi - 32 * offset)
}

/// The dot product of one weight row (its blocks, `format`) with one quantized
/// activation row, in plain Rust: block terms summed in f32 in block order. The
/// kernels' arithmetic written out, which the tests hold them to (serving uses
/// the kernels, or candle where they do not run).
pub fn dot_portable(format: Format, w: &[u8], y: &[Q8K]) -> f32 {
    let bytes = format.block_bytes();
    let mut sum = 0f32;
    for (block, y) in w.chunks_exact(bytes).zip(y) {
        sum += match format {
            Format::Q4K => {
                let (d, sumi, dmin, summ) = q4k_block_portable(block, y);
                d * sumi as f32 - dmin * summ as f32
            }
            Format::Q6K => {
                let (d, sumi) = q6k_block_portable(block, y);
                d * sumi as f32
            }
        };
    }
    sum
}

#[cfg(test)]
/// The same dot product in f64 over the exact block terms, and a bound on the
/// magnitude of any partial sum a kernel may form on the way: every integer
/// product taken in absolute value, times its block's f32 factor. A kernel that
/// groups the integer sums into vector lanes, and scales each lane, rounds each
/// of those lane terms; their magnitudes add up to at most this.
fn dot_reference(format: Format, w: &[u8], y: &[Q8K]) -> (f64, f64) {
    let (mut sum, mut magnitude) = (0f64, 0f64);
    for (block, y) in w.chunks_exact(format.block_bytes()).zip(y) {
        match format {
            Format::Q4K => {
                let (d, sumi, dmin, summ) = q4k_block_portable(block, y);
                sum += d as f64 * sumi as f64 - dmin as f64 * summ as f64;
                let (sc, m) = q4k_scales(&block[4..16]);
                let qs = &block[16..Q4K_BYTES];
                let mut abs = 0i64;
                for e in 0..QK {
                    let (byte, sub) = (qs[32 * (e / 64) + e % 32], e / 32);
                    let q = if (e / 32) % 2 == 0 { byte & 0xF } else { byte >> 4 };
                    abs += (sc[sub] as i64 * q as i64 * y.qs[e] as i64).abs();
                }
                let mins: i64 = (0..16).map(|s| (m[s / 2] as i64 * y.bsums[s] as i64).abs()).sum();
                magnitude += (d as f64).abs() * abs as f64 + (dmin as f64).abs() * mins as f64;
            }
            Format::Q6K => {
                let (d, sumi) = q6k_block_portable(block, y);
                sum += d as f64 * sumi as f64;
                let sc = |s: usize| (block[192 + s] as i8) as i64;
                let mut abs = 0i64;
                for e in 0..QK {
                    abs += (sc(e / 16) * q6k_value(block, e) as i64 * y.qs[e] as i64).abs();
                }
                let offset: i64 = (0..16).map(|s| (32 * sc(s) * y.bsums[s] as i64).abs()).sum();
                magnitude += (d as f64).abs() * (abs + offset) as f64;
            }
        }
    }
    (sum, magnitude)
}

/// Value `e` of a Q6_K block, 0..64 (before its offset of 32).
fn q6k_value(block: &[u8], e: usize) -> u8 {
    let (h, t, l) = (e / 128, (e % 128) / 32, e % 32);
    let (ql, qh) = (&block[64 * h..], block[128 + 32 * h + l]);
    let low = if t % 2 == 0 { ql[l] } else { ql[l + 32] };
    let low = if t < 2 { low & 0xF } else { low >> 4 };
    low | (((qh >> (2 * t)) & 3) << 4)
}

/// Most activation rows these kernels take; candle's quantized matmul takes
/// more. The kernels decode each weight block once for up to four rows, and
/// their cost then grows with the rows: 36 Q4_K matrices of (11008, 2048)
/// streamed from memory on 2 cores of an AMD EPYC (AVX-512 VNNI) took 14.6 ms
/// at 1 row (candle: 19.5 ms), 31.8 ms at 4 (candle: 40.7 ms) and 60.7 ms at 8,
/// where candle's repacked VNNI kernels took 42.7 ms.
pub const MAX_ROWS: usize = 4;

/// `x W^T` for x (b, k) f32 on the CPU and W a Q4_K or Q6_K matrix (n, k), as an
/// f32 tensor (b, n); None where candle's quantized matmul takes it instead:
/// other formats, devices or CPUs, or more than [`MAX_ROWS`] rows.
pub fn product(x: &Tensor, w: &QTensor) -> candle_core::Result<Option<Tensor>> {
    let Some(format) = Format::of(w.dtype()) else { return Ok(None) };
    if !x.device().is_cpu() || x.dtype() != DType::F32 || !cfg!(target_arch = "x86_64") || !has_avx2() {
        return Ok(None);
    }
    let (b, k) = x.dims2()?;
    if b > MAX_ROWS {
        return Ok(None);
    }
    let (n, wk) = w.shape().dims2()?;
    if wk != k || !k.is_multiple_of(QK) {
        return Ok(None);
    }
    let xs = x.flatten_all()?.to_vec1::<f32>()?;
    let ys: Vec<Vec<Q8K>> = xs.chunks_exact(k).map(quantize_q8k).collect();
    let data = w.data()?;
    let row_bytes = k / QK * format.block_bytes();
    assert_eq!(data.len(), n * row_bytes, "a {format:?} matrix ({n}, {k}) holds {} bytes", data.len());
    let mut out = vec![0f32; b * n];
    split(n, 8, data.len(), &mut out, |c0, c1, out| {
        for c in c0..c1 {
            rows_dot(format, &data[c * row_bytes..(c + 1) * row_bytes], &ys, c, out);
        }
    });
    drop(data);
    Ok(Some(Tensor::from_vec(out, (b, n), x.device())?))
}

/// Column `c` of the output: weight row `w` against every activation row, up to
/// four at a time, so each weight block is decoded once for four rows.
fn rows_dot(format: Format, w: &[u8], ys: &[Vec<Q8K>], c: usize, out: Out) {
    fn block<const R: usize>(format: Format, w: &[u8], ys: &[Vec<Q8K>], i: usize, c: usize, out: Out) {
        let rows: [&[Q8K]; R] = std::array::from_fn(|q| ys[i + q].as_slice());
        for (q, d) in dots(format, w, rows).into_iter().enumerate() {
            out.set(i + q, c, d);
        }
    }
    let mut i = 0;
    while i < ys.len() {
        let r = (ys.len() - i).min(4);
        match r {
            1 => block::<1>(format, w, ys, i, c, out),
            2 => block::<2>(format, w, ys, i, c, out),
            3 => block::<3>(format, w, ys, i, c, out),
            _ => block::<4>(format, w, ys, i, c, out),
        }
        i += r;
    }
}

fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

fn dots<const R: usize>(format: Format, w: &[u8], ys: [&[Q8K]; R]) -> [f32; R] {
    // SAFETY: `product`, the only caller, checked for AVX2, FMA and F16C; the
    // kernels check that `w` holds one whole block per Q8_K block of each row.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        match format {
            Format::Q4K => x86::q4k_dots(w, ys),
            Format::Q6K => x86::q6k_dots(w, ys),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (format, w, ys);
        unreachable!("no K-quant kernel on this CPU: `product` leaves these products to candle")
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{q4k_unpack, Q4K_BYTES, Q6K_BYTES, Q8K, QK};
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// An f16 at `p`, widened.
    #[target_feature(enable = "avx2,f16c")]
    #[inline]
    unsafe fn half_at(p: *const u8) -> f32 {
        let bits = std::ptr::read_unaligned(p as *const u16);
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
    }

    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn hsum128(s: __m128) -> f32 {
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
    }

    /// R activation rows against one Q4_K weight row.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn q4k_dots<const R: usize>(w: &[u8], ys: [&[Q8K]; R]) -> [f32; R] {
        let blocks = w.len() / Q4K_BYTES;
        assert!(w.len().is_multiple_of(Q4K_BYTES) && ys.iter().all(|y| y.len() == blocks));
        let low = _mm256_set1_epi8(0xF);
        let mut acc = [_mm256_setzero_ps(); R];
        let mut acc_mins = [_mm_setzero_ps(); R];
        for i in 0..blocks {
            let block = w.as_ptr().add(i * Q4K_BYTES);
            let u = q4k_unpack(std::slice::from_raw_parts(block.add(4), 12));
            let sc = [u[0].to_le_bytes(), u[1].to_le_bytes()];
            let mins = _mm_cvtepu8_epi16(_mm_set_epi32(0, 0, u[3] as i32, u[2] as i32));
            let (d, dmin) = (half_at(block), half_at(block.add(2)));
            let qs = block.add(16);
            let mut sumi = [_mm256_setzero_si256(); R];
            for j in 0..4 {
                let q4 = _mm256_loadu_si256(qs.add(32 * j) as *const __m256i);
                let lo = _mm256_and_si256(q4, low);
                let hi = _mm256_and_si256(_mm256_srli_epi16(q4, 4), low);
                let s_lo = _mm256_set1_epi16(sc[j / 2][2 * (j % 2)] as i16);
                let s_hi = _mm256_set1_epi16(sc[j / 2][2 * (j % 2) + 1] as i16);
                for r in 0..R {
                    let y = ys[r].get_unchecked(i).qs.as_ptr().add(64 * j);
                    let y_lo = _mm256_loadu_si256(y as *const __m256i);
                    let y_hi = _mm256_loadu_si256(y.add(32) as *const __m256i);
                    let p_lo = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, y_lo), s_lo);
                    let p_hi = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, y_hi), s_hi);
                    sumi[r] = _mm256_add_epi32(sumi[r], _mm256_add_epi32(p_lo, p_hi));
                }
            }
            for r in 0..R {
                let y = ys[r].get_unchecked(i);
                acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * y.d), _mm256_cvtepi32_ps(sumi[r]), acc[r]);
                // The mins against the sums of each 32 activations.
                let bsums = _mm256_loadu_si256(y.bsums.as_ptr() as *const __m256i);
                let pairs = _mm_hadd_epi16(_mm256_castsi256_si128(bsums), _mm256_extracti128_si256(bsums, 1));
                let m = _mm_cvtepi32_ps(_mm_madd_epi16(mins, pairs));
                acc_mins[r] = _mm_fmadd_ps(_mm_set1_ps(dmin * y.d), m, acc_mins[r]);
            }
        }
        std::array::from_fn(|r| hsum(acc[r]) - hsum128(acc_mins[r]))
    }

    /// R activation rows against one Q6_K weight row.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn q6k_dots<const R: usize>(w: &[u8], ys: [&[Q8K]; R]) -> [f32; R] {
        let blocks = w.len() / Q6K_BYTES;
        assert!(w.len().is_multiple_of(Q6K_BYTES) && ys.iter().all(|y| y.len() == blocks));
        let (low, two_bits) = (_mm256_set1_epi8(0xF), _mm256_set1_epi8(3));
        let mut acc = [_mm256_setzero_ps(); R];
        for i in 0..blocks {
            let block = std::slice::from_raw_parts(w.as_ptr().add(i * Q6K_BYTES), Q6K_BYTES);
            let sc: [i8; 16] = std::array::from_fn(|s| block[192 + s] as i8);
            let scales16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(block.as_ptr().add(192) as *const __m128i));
            let d = half_at(block.as_ptr().add(208));
            let mut sumi = [_mm256_setzero_si256(); R];
            for h in 0..2 {
                let ql = block.as_ptr().add(64 * h);
                let qh = _mm256_loadu_si256(block.as_ptr().add(128 + 32 * h) as *const __m256i);
                let ql0 = _mm256_loadu_si256(ql as *const __m256i);
                let ql1 = _mm256_loadu_si256(ql.add(32) as *const __m256i);
                // Bits 4-5 of each value, from its 2-bit field of qh (16-bit
                // shifts carry bits across bytes; the mask drops them).
                let h0 = _mm256_slli_epi16(_mm256_and_si256(qh, two_bits), 4);
                let h1 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2), two_bits), 4);
                let h2 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 4), two_bits), 4);
                let h3 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 6), two_bits), 4);
                let q = [
                    _mm256_or_si256(_mm256_and_si256(ql0, low), h0),
                    _mm256_or_si256(_mm256_and_si256(ql1, low), h1),
                    _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql0, 4), low), h2),
                    _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql1, 4), low), h3),
                ];
                for (t, &q) in q.iter().enumerate() {
                    // 32 values: the first 16 take scale 8h + 2t, the next 16 the one after.
                    let s = 8 * h + 2 * t;
                    let scale = _mm256_set_m128i(_mm_set1_epi16(sc[s + 1] as i16), _mm_set1_epi16(sc[s] as i16));
                    for r in 0..R {
                        let y = ys[r].get_unchecked(i).qs.as_ptr().add(128 * h + 32 * t);
                        let y = _mm256_loadu_si256(y as *const __m256i);
                        let p = _mm256_madd_epi16(_mm256_maddubs_epi16(q, y), scale);
                        sumi[r] = _mm256_add_epi32(sumi[r], p);
                    }
                }
            }
            for r in 0..R {
                let y = ys[r].get_unchecked(i);
                // sum (q - 32) y = sum q y - 32 sum y, per scale.
                let bsums = _mm256_loadu_si256(y.bsums.as_ptr() as *const __m256i);
                let offset = _mm256_slli_epi32(_mm256_madd_epi16(scales16, bsums), 5);
                let sumi = _mm256_sub_epi32(sumi[r], offset);
                acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * y.d), _mm256_cvtepi32_ps(sumi), acc[r]);
            }
        }
        std::array::from_fn(|r| hsum(acc[r]))
    }

    const _: () = assert!(QK == 256);
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::QMatMul;
    use candle_core::{Device, Module};

    /// A random (n, k) matrix quantized to `dtype`, and random activations (b, k).
    fn case(dtype: GgmlDType, b: usize, n: usize, k: usize, seed: u64) -> (Tensor, QTensor) {
        let dev = Device::Cpu;
        let mut state = seed;
        let mut next = move || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        };
        let w: Vec<f32> = (0..n * k).map(|_| next() * 0.05).collect();
        let x: Vec<f32> = (0..b * k).map(|_| next() * 3.0).collect();
        let w = QTensor::quantize(&Tensor::from_vec(w, (n, k), &dev).unwrap(), dtype).unwrap();
        (Tensor::from_vec(x, (b, k), &dev).unwrap(), w)
    }

    const U: f64 = f32::EPSILON as f64 / 2.0;

    #[test]
    fn kernels_match_the_exact_block_sums_within_f32_rounding_of_the_block_terms() {
        for dtype in [GgmlDType::Q4K, GgmlDType::Q6K] {
            let format = Format::of(dtype).unwrap();
            for b in [1, 3, 4] {
                let (k, n) = (4 * QK, 37);
                let (x, w) = case(dtype, b, n, k, b as u64);
                let data = w.data().unwrap();
                let row = k / QK * format.block_bytes();
                let xs = x.to_vec2::<f32>().unwrap();
                let ys: Vec<Vec<Q8K>> = xs.iter().map(|r| quantize_q8k(r)).collect();
                let got = match product(&x, &w).unwrap() {
                    Some(t) => t.to_vec2::<f32>().unwrap(),
                    // No AVX2 here: the portable path is what this CPU serves with.
                    None => ys
                        .iter()
                        .map(|y| (0..n).map(|c| dot_portable(format, &data[c * row..][..row], y)).collect())
                        .collect(),
                };
                for (i, y) in ys.iter().enumerate() {
                    for c in 0..n {
                        let (exact, magnitude) = dot_reference(format, &data[c * row..][..row], y);
                        // Each block term is one f32 product of an exact integer
                        // (k / QK + 2 roundings in any summation order, lanes included).
                        let bound = (k / QK + 2 + 8) as f64 * U * magnitude * 1.01;
                        let err = (got[i][c] as f64 - exact).abs();
                        assert!(
                            err <= bound,
                            "{dtype:?} b={b} row {i} col {c}: {} vs {exact}, bound {bound:e}",
                            got[i][c]
                        );
                        let portable = dot_portable(format, &data[c * row..][..row], y) as f64;
                        assert!((portable - exact).abs() <= bound, "{dtype:?} portable: {portable} vs {exact}");
                    }
                }
            }
        }
    }

    /// Candle computes the same exact integers from the same Q8_K activations, so
    /// the two agree to f32 rounding of the block terms: this ties the block
    /// decoding here to candle's (and so to llama.cpp's) format.
    #[test]
    fn kernels_agree_with_candles_quantized_matmul() {
        for dtype in [GgmlDType::Q4K, GgmlDType::Q6K] {
            let format = Format::of(dtype).unwrap();
            let (b, n, k) = (3, 40, 8 * QK);
            let (x, w) = case(dtype, b, n, k, 11);
            let data = w.data().unwrap().into_owned();
            let row = k / QK * format.block_bytes();
            let ours: Vec<Vec<f32>> = match product(&x, &w).unwrap() {
                Some(t) => t.to_vec2().unwrap(),
                None => return, // no AVX2: candle's own path serves
            };
            let theirs =
                QMatMul::from_arc(std::sync::Arc::new(w)).unwrap().forward(&x).unwrap().to_vec2::<f32>().unwrap();
            for (i, xr) in x.to_vec2::<f32>().unwrap().iter().enumerate() {
                let y = quantize_q8k(xr);
                for c in 0..n {
                    let (_, magnitude) = dot_reference(format, &data[c * row..][..row], &y);
                    let bound = 2.0 * (k / QK + 2 + 8) as f64 * U * magnitude * 1.01;
                    let diff = (ours[i][c] - theirs[i][c]).abs() as f64;
                    assert!(
                        diff <= bound,
                        "{dtype:?} ({i}, {c}): ours {} candle {} bound {bound:e}",
                        ours[i][c],
                        theirs[i][c]
                    );
                }
            }
        }
    }

    #[test]
    fn other_formats_and_shapes_are_left_to_candle() {
        let (x, w) = case(GgmlDType::Q8_0, 2, 8, QK, 1);
        assert!(product(&x, &w).unwrap().is_none());
        let (x, w) = case(GgmlDType::Q4K, MAX_ROWS + 1, 8, QK, 1);
        assert!(product(&x, &w).unwrap().is_none());
        let (x, w) = case(GgmlDType::Q4K, 2, 8, QK, 1);
        assert!(product(&x.to_dtype(DType::F16).unwrap(), &w).unwrap().is_none());
    }
}
