//! Where a model's tensors come from, and the forms a weight matrix takes.
//!
//! The forward pass asks for tensors by their Hugging Face names
//! (`model.layers.0.self_attn.q_proj.weight`). A safetensors directory answers with
//! dense tensors in the dtype asked for, quantized at load when `--quantize` asks
//! for it; a GGUF file answers with each tensor in the format the file holds it in
//! ([`crate::gguf`] maps the names). Norms and biases always come back dense, in
//! the compute dtype.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use std::sync::Arc;

/// A weight matrix (out, in), as it is held for the forward pass.
pub enum Matrix {
    /// A dense tensor: f32, f16 or bf16 (on the CPU, products widen half weights
    /// to f32 as they load them).
    Dense(Tensor),
    /// GGML blocks (Q8_0, Q4_K, Q6_K, ...), multiplied by candle's quantized
    /// kernels; shared, because a tied vocabulary projection is also the
    /// embedding table.
    Quantized(Arc<QTensor>),
}

impl Matrix {
    /// The matrix's storage format as llama.cpp names it (`f16`, `q4_k`, ...).
    pub fn format(&self) -> String {
        match self {
            Matrix::Dense(t) => format!("{:?}", t.dtype()).to_lowercase(),
            Matrix::Quantized(q) => ggml_name(q.dtype()).to_owned(),
        }
    }
}

/// llama.cpp's lower-case name of a GGML tensor type.
pub fn ggml_name(dtype: GgmlDType) -> &'static str {
    match dtype {
        GgmlDType::F32 => "f32",
        GgmlDType::F16 => "f16",
        GgmlDType::BF16 => "bf16",
        GgmlDType::Q4_0 => "q4_0",
        GgmlDType::Q4_1 => "q4_1",
        GgmlDType::Q5_0 => "q5_0",
        GgmlDType::Q5_1 => "q5_1",
        GgmlDType::Q8_0 => "q8_0",
        GgmlDType::Q8_1 => "q8_1",
        GgmlDType::Q2K => "q2_k",
        GgmlDType::Q3K => "q3_k",
        GgmlDType::Q4K => "q4_k",
        GgmlDType::Q5K => "q5_k",
        GgmlDType::Q6K => "q6_k",
        GgmlDType::Q8K => "q8_k",
    }
}

/// `--quantize`: the block format a safetensors model's matrices are quantized to
/// as it loads (in-situ quantization), so that a Hugging Face directory serves
/// from the same kernels as a GGUF file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Quantization {
    /// Every matrix in Q8_0 (8-bit, blocks of 32).
    Q8_0,
    /// llama.cpp's Q4_K_M recipe: Q4_K for most matrices, Q6_K for the vocabulary
    /// and for attn_v / ffn_down in half the layers (see [`Quantization::ggml_type`]).
    Q4K,
}

/// The kind of matrix a name is, for the recipes that treat them differently.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The token embedding and (tied or not) the vocabulary projection.
    Vocabulary,
    /// The value projection or the MLP's down projection of layer `layer`.
    Sensitive { layer: usize },
    /// Every other projection.
    Other,
}

impl Role {
    /// The role of the Hugging Face tensor `name` in a model of `layers` layers.
    pub fn of(name: &str) -> Role {
        if name.contains("embed_tokens") || name.starts_with("lm_head") {
            return Role::Vocabulary;
        }
        let layer = name.strip_prefix("model.layers.").and_then(|rest| rest.split('.').next()?.parse().ok());
        match layer {
            Some(layer) if name.contains("v_proj") || name.contains("down_proj") => Role::Sensitive { layer },
            _ => Role::Other,
        }
    }
}

impl Quantization {
    /// The block format for a matrix of `role` whose rows are `inner` long, in a
    /// model of `layers` layers.
    ///
    /// Q4_K_M follows llama.cpp's `llama-quantize`: the vocabulary in Q6_K, and
    /// attn_v / ffn_down in Q6_K in the first and last eighth of the layers and in
    /// every third layer between (18 of 36 on Qwen2.5-3B). k-quant blocks hold 256
    /// values and Q8_0 blocks 32; a row that is no multiple of the block falls back
    /// to Q8_0, then to f16 (`None`), as llama.cpp falls back for such shapes.
    pub fn ggml_type(self, role: Role, inner: usize, layers: usize) -> Option<GgmlDType> {
        let wanted = match self {
            Quantization::Q8_0 => GgmlDType::Q8_0,
            Quantization::Q4K => match role {
                Role::Vocabulary => GgmlDType::Q6K,
                Role::Sensitive { layer } if more_bits(layer, layers) => GgmlDType::Q6K,
                _ => GgmlDType::Q4K,
            },
        };
        [wanted, GgmlDType::Q8_0].into_iter().find(|t| inner.is_multiple_of(t.block_size()))
    }

    /// How `--quantize` spells it.
    pub fn name(self) -> &'static str {
        match self {
            Quantization::Q8_0 => "q8_0",
            Quantization::Q4K => "q4k",
        }
    }
}

/// llama.cpp's `use_more_bits`: the layers whose sensitive matrices Q4_K_M keeps
/// in Q6_K.
fn more_bits(layer: usize, layers: usize) -> bool {
    let eighth = layers / 8;
    // Past the first disjunct, layer >= eighth.
    layer < eighth || layer >= 7 * layers / 8 || (layer - eighth) % 3 == 2
}

/// What a model's tensors are read from, by Hugging Face name.
pub trait TensorSource {
    /// The weight matrix `name`, shape (out, in).
    fn matrix(&self, name: &str, shape: (usize, usize)) -> candle_core::Result<Matrix>;
    /// A norm weight or bias of `len` values, in `dtype`.
    fn vector(&self, name: &str, len: usize, dtype: DType) -> candle_core::Result<Tensor>;
    /// Whether the source holds `name` (an untied `lm_head.weight`, say).
    fn contains(&self, name: &str) -> bool;
    /// The dtype dense matrices come in (GGUF: the file's own per tensor, so
    /// this is the compute dtype asked for).
    fn dtype(&self) -> DType;
    fn device(&self) -> &Device;
}

/// A safetensors model (or tensors built in memory), dense in the VarBuilder's
/// dtype, or quantized as it loads.
pub struct Safetensors {
    pub vb: VarBuilder<'static>,
    pub quantize: Option<Quantization>,
    /// The model's depth, for recipes that vary by layer.
    pub layers: usize,
}

impl TensorSource for Safetensors {
    fn matrix(&self, name: &str, shape: (usize, usize)) -> candle_core::Result<Matrix> {
        let quantized = self.quantize.and_then(|q| q.ggml_type(Role::of(name), shape.1, self.layers));
        match quantized {
            None => Ok(Matrix::Dense(self.vb.get(shape, name)?)),
            Some(ggml) => {
                let w = self.vb.get_with_hints_dtype(shape, name, Default::default(), DType::F32)?;
                Ok(Matrix::Quantized(Arc::new(QTensor::quantize(&w, ggml)?)))
            }
        }
    }

    fn vector(&self, name: &str, len: usize, dtype: DType) -> candle_core::Result<Tensor> {
        // Read straight into `dtype`: a norm stored in f32 must not pass through
        // the f16 asked for the matrices.
        self.vb.get_with_hints_dtype(len, name, Default::default(), dtype)
    }

    fn contains(&self, name: &str) -> bool {
        self.vb.contains_tensor(name)
    }

    fn dtype(&self) -> DType {
        self.vb.dtype()
    }

    fn device(&self) -> &Device {
        self.vb.device()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q4_k_m_keeps_half_the_sensitive_layers_of_a_36_layer_model_in_q6_k() {
        let q6 = (0..36)
            .filter(|&l| Quantization::Q4K.ggml_type(Role::Sensitive { layer: l }, 2048, 36) == Some(GgmlDType::Q6K))
            .count();
        assert_eq!(q6, 18);
        assert_eq!(Quantization::Q4K.ggml_type(Role::Other, 2048, 36), Some(GgmlDType::Q4K));
        assert_eq!(Quantization::Q4K.ggml_type(Role::Vocabulary, 2048, 36), Some(GgmlDType::Q6K));
    }

    #[test]
    fn rows_that_fit_no_block_fall_back_to_q8_0_then_to_dense() {
        assert_eq!(Quantization::Q4K.ggml_type(Role::Other, 96, 2), Some(GgmlDType::Q8_0));
        assert_eq!(Quantization::Q8_0.ggml_type(Role::Other, 100, 2), None);
    }

    #[test]
    fn roles_are_read_from_hugging_face_names() {
        assert_eq!(Role::of("model.embed_tokens.weight"), Role::Vocabulary);
        assert_eq!(Role::of("lm_head.weight"), Role::Vocabulary);
        assert_eq!(Role::of("model.layers.7.self_attn.v_proj.weight"), Role::Sensitive { layer: 7 });
        assert_eq!(Role::of("model.layers.3.mlp.down_proj.weight"), Role::Sensitive { layer: 3 });
        assert_eq!(Role::of("model.layers.3.mlp.up_proj.weight"), Role::Other);
    }
}
