//! Single-query attention over a cache, fused, on the CPU.
//!
//! What it replaces: for a decode step (one query token) `qwen2::attend` runs a
//! chain of candle ops per sequence and layer: the cached rows converted to the
//! query's dtype (a copy of the whole cache every step when it is stored in f16
//! or bf16: 4.8% of a batch-1 profile with an f16 cache was that conversion),
//! the score matmul, a scale, a concatenation with the shared prefix's scores,
//! the softmax, two narrows and copies, and two value matmuls, each allocating its
//! result. Here the same arithmetic reads the cache where it lies, in its own
//! dtype, and writes only the two outputs.
//!
//! The arithmetic is the chain's: scores in f32, one softmax over the shared
//! prefix's rows and the sequence's own, f32 weighted sums; only the order of the
//! sums differs (tested against the chain within the rounding bound, in
//! `qwen2`'s tests).

use candle_core::{DType, Storage, Tensor};
use half::{bf16, f16};

/// A cache buffer's values, in its dtype.
#[derive(Clone, Copy)]
enum Rows<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    Bf16(&'a [bf16]),
}

impl Rows<'_> {
    /// The `out.len()` values from `at`, widened into `out`.
    fn row_into(&self, at: usize, out: &mut [f32]) {
        use half::slice::HalfFloatSliceExt;
        let n = out.len();
        match self {
            Rows::F32(s) => out.copy_from_slice(&s[at..at + n]),
            Rows::F16(s) => s[at..at + n].convert_to_f32_slice(out),
            Rows::Bf16(s) => s[at..at + n].convert_to_f32_slice(out),
        }
    }
}

/// A (kv, rows, width) tensor's storage as seen by [`single_query`]: its
/// values, where each head starts, and the distance between rows. None where the
/// tensor is not on the CPU, not in f32, f16 or bf16, or its rows are not
/// contiguous.
struct View<'a> {
    rows: Rows<'a>,
    heads: Vec<usize>,
    stride: usize,
    len: usize,
}

fn view<'a>(storage: &'a Storage, t: &Tensor) -> Option<View<'a>> {
    let Storage::Cpu(cpu) = storage else { return None };
    let layout = t.layout();
    let (kv, len, width) = t.dims3().ok()?;
    let strides = layout.stride();
    if strides[2] != 1 || (len > 1 && strides[1] < width) {
        return None;
    }
    let start = layout.start_offset();
    let heads = (0..kv).map(|h| start + h * strides[0]).collect();
    let rows = match t.dtype() {
        DType::F32 => Rows::F32(cpu.as_slice::<f32>().ok()?),
        DType::F16 => Rows::F16(cpu.as_slice::<f16>().ok()?),
        DType::BF16 => Rows::Bf16(cpu.as_slice::<bf16>().ok()?),
        _ => return None,
    };
    Some(View { rows, heads, stride: strides[1], len })
}

/// Attention of one decode token: q (kv, g, d) over a shared prefix's plaintext
/// rows `shared` (kv, p, d), if any, and q_own (kv, g, w) over the sequence's own
/// rows (kv, len, w), one softmax spanning both, scaled by 1 / sqrt(d). Returns
/// the prefix's share of the output (kv, g, d) and the own rows' share (kv, g,
/// w), as `qwen2::attend` does; None where the inputs are not ones this kernel
/// takes (the caller runs the candle chain).
pub fn single_query(
    q: &Tensor,
    q_own: &Tensor,
    shared: Option<(&Tensor, &Tensor)>,
    keys: &Tensor,
    values: &Tensor,
) -> candle_core::Result<Option<(Option<Tensor>, Tensor)>> {
    let (kv, g, d) = q.dims3()?;
    let (_, _, w) = q_own.dims3()?;
    if !q.device().is_cpu() || q.dtype() != DType::F32 || q_own.dtype() != DType::F32 {
        return Ok(None);
    }
    let qs = q.flatten_all()?.to_vec1::<f32>()?;
    let qo = q_own.flatten_all()?.to_vec1::<f32>()?;
    let (ks, _) = keys.storage_and_layout();
    let (vs, _) = values.storage_and_layout();
    let (Some(kview), Some(vview)) = (view(&ks, keys), view(&vs, values)) else { return Ok(None) };
    let len = kview.len;
    if keys.dims3()? != (kv, len, w) || values.dims3()? != (kv, len, w) || q_own.dims3()? != (kv, g, w) {
        candle_core::bail!(
            "fused attention: queries {:?} and {:?} over keys {:?} and values {:?}",
            q.dims(),
            q_own.dims(),
            keys.dims(),
            values.dims()
        );
    }
    if let Some((k, v)) = shared {
        if k.dims3()? != (kv, k.dim(1)?, d) || v.dims() != k.dims() {
            candle_core::bail!("fused attention: a shared prefix of {:?} and {:?}", k.dims(), v.dims());
        }
    }
    let shared_storage = shared.map(|(k, v)| (k.storage_and_layout().0, v.storage_and_layout().0, k, v));
    let shared_view = match &shared_storage {
        Some((ks, vs, k, v)) => match (view(ks, k), view(vs, v)) {
            (Some(a), Some(b)) => Some((a, b)),
            _ => return Ok(None),
        },
        None => None,
    };
    let p = shared_view.as_ref().map_or(0, |(k, _)| k.len);
    let scale = 1f32 / (d as f32).sqrt();
    let mut head_out = vec![0f32; kv * g * d];
    let mut own_out = vec![0f32; kv * g * w];
    let mut scores = vec![0f32; g * (p + len)];
    let mut row = vec![0f32; w.max(d)];
    for h in 0..kv {
        // Scores of every query of this group, row by row: each cached row is
        // widened once and serves all g queries.
        let q_h = &qs[h * g * d..(h + 1) * g * d];
        let qo_h = &qo[h * g * w..(h + 1) * g * w];
        if let Some((sk, _)) = &shared_view {
            for j in 0..p {
                sk.rows.row_into(sk.heads[h] + j * sk.stride, &mut row[..d]);
                for i in 0..g {
                    scores[i * (p + len) + j] = dot(&q_h[i * d..(i + 1) * d], &row[..d]) * scale;
                }
            }
        }
        for j in 0..len {
            kview.rows.row_into(kview.heads[h] + j * kview.stride, &mut row[..w]);
            for i in 0..g {
                scores[i * (p + len) + p + j] = dot(&qo_h[i * w..(i + 1) * w], &row[..w]) * scale;
            }
        }
        for i in 0..g {
            softmax(&mut scores[i * (p + len)..(i + 1) * (p + len)]);
        }
        if let Some((_, sv)) = &shared_view {
            for j in 0..p {
                sv.rows.row_into(sv.heads[h] + j * sv.stride, &mut row[..d]);
                for i in 0..g {
                    let pj = scores[i * (p + len) + j];
                    axpy(pj, &row[..d], &mut head_out[(h * g + i) * d..(h * g + i + 1) * d]);
                }
            }
        }
        for j in 0..len {
            vview.rows.row_into(vview.heads[h] + j * vview.stride, &mut row[..w]);
            for i in 0..g {
                let pj = scores[i * (p + len) + p + j];
                axpy(pj, &row[..w], &mut own_out[(h * g + i) * w..(h * g + i + 1) * w]);
            }
        }
    }
    drop((ks, vs, shared_storage));
    let device = q.device();
    let head = match shared {
        Some(_) => Some(Tensor::from_vec(head_out, (kv, g, d), device)?),
        None => None,
    };
    Ok(Some((head, Tensor::from_vec(own_out, (kv, g, w), device)?)))
}

/// sum_i a[i] * b[i] in 16 independent lanes (which the compiler vectorizes),
/// then across them.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..16 {
            lanes[l] += x[l] * y[l];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// out += a * x.
fn axpy(a: f32, x: &[f32], out: &mut [f32]) {
    for (o, v) in out.iter_mut().zip(x) {
        *o += a * v;
    }
}

/// In place, as candle's `softmax_last_dim`: exp(x - max), divided by the sum.
fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    for v in x.iter_mut() {
        *v /= sum;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn an_f64_cache_or_mismatched_shapes_are_declined_or_refused() {
        let dev = Device::Cpu;
        let q = Tensor::zeros((1, 2, 8), DType::F32, &dev).unwrap();
        let k = Tensor::zeros((1, 4, 8), DType::F64, &dev).unwrap();
        assert!(single_query(&q, &q, None, &k, &k).unwrap().is_none(), "an exact (f64) cache takes the chain");
        let k = Tensor::zeros((1, 4, 9), DType::F32, &dev).unwrap();
        assert!(single_query(&q, &q, None, &k, &k).is_err(), "rows wider than the query are an error");
    }
}
