//! Weight sources: HF safetensors checkpoints (memory-mapped, each rank reading only its slice)
//! and deterministic dummy weights. HF tensor names are used end to end.

use std::ops::Range;

use half::bf16;

/// Host-side tensor storage. bf16 on disk stays bf16; f16 and f32 become f32.
#[derive(Clone, Debug, PartialEq)]
pub enum HostData {
    F32(Vec<f32>),
    Bf16(Vec<bf16>),
}

/// A row-major host tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: HostData,
}

/// Which part of a tensor to read. Rows and columns refer to the 2-D `[rows, cols]` layout of
/// HF Linear weights (`[out_features, in_features]`); a 1-D tensor only takes `Full` or `Rows`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Slice {
    Full,
    Rows(Range<usize>),
    Cols(Range<usize>),
}

/// Something that yields a rank's slices of named tensors.
pub trait WeightSource: Send + Sync {
    /// For banners and errors ("checkpoint /path", "dummy weights, seed 0").
    fn describe(&self) -> String;
    /// Reads `slice` of tensor `name`, whose full shape must be `shape`; a different shape on
    /// disk is an error naming the tensor, the file and both shapes.
    fn load(&self, name: &str, shape: &[usize], slice: Slice) -> crate::Result<HostTensor>;
}

impl HostTensor {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn to_f32(&self) -> Vec<f32> {
        match &self.data {
            HostData::F32(v) => v.clone(),
            HostData::Bf16(v) => v.iter().map(|x| x.to_f32()).collect(),
        }
    }
}
