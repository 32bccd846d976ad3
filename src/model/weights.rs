//! Reading safetensors checkpoints: one `model.safetensors`, a sharded set listed by
//! `model.safetensors.index.json`, or bytes compiled into the binary (the embedded tiny model).
//!
//! Files are memory-mapped, so a tensor is copied once: from the page cache into the buffer that
//! becomes the device tensor, converted on the way to the dtype the backend computes in.

use std::collections::HashMap;
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};

use burn::tensor::{DType, TensorData};
use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use super::ModelError;

/// The raw bytes of every checkpoint file, kept alive while tensors are read from them.
pub enum CheckpointBytes {
    Mapped(Vec<(PathBuf, Mmap)>),
    Static(Vec<(&'static str, &'static [u8])>),
}

impl CheckpointBytes {
    /// Maps `model.safetensors`, or every shard named in `model.safetensors.index.json`.
    pub fn open_dir(dir: &Path) -> Result<Self, ModelError> {
        let index = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(|e| ModelError::io(&index, e))?;
            let json: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| ModelError::Config(format!("{}: {e}", index.display())))?;
            let map = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| ModelError::Config(format!("{}: no weight_map", index.display())))?;
            let mut names: Vec<&str> = map.values().filter_map(|v| v.as_str()).collect();
            names.sort_unstable();
            names.dedup();
            names.into_iter().map(|n| dir.join(n)).collect()
        } else {
            vec![dir.join("model.safetensors")]
        };
        let mut maps = Vec::with_capacity(files.len());
        for path in files {
            let file = File::open(&path).map_err(|e| ModelError::io(&path, e))?;
            // SAFETY: the checkpoint is read-only for the server's lifetime; a file truncated
            // underneath us is an operator error we cannot guard against with mmap.
            let map = unsafe { Mmap::map(&file) }.map_err(|e| ModelError::io(&path, e))?;
            tracing::info!(file = %path.display(), bytes = map.len(), "mapped checkpoint shard");
            maps.push((path, map));
        }
        Ok(CheckpointBytes::Mapped(maps))
    }

    fn buffers(&self) -> Vec<(String, &[u8])> {
        match self {
            CheckpointBytes::Mapped(m) => m.iter().map(|(p, m)| (p.display().to_string(), &m[..])).collect(),
            CheckpointBytes::Static(s) => s.iter().map(|(n, b)| (n.to_string(), *b)).collect(),
        }
    }

    /// Parses the safetensors headers of every file into one name -> tensor index.
    pub fn index(&self) -> Result<WeightIndex<'_>, ModelError> {
        let mut tensors = HashMap::new();
        let buffers = self.buffers();
        let files = buffers
            .iter()
            .map(|(n, _)| n.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        for (name, bytes) in buffers.iter().map(|(n, b)| (n.clone(), *b)) {
            let st =
                SafeTensors::deserialize(bytes).map_err(|e| ModelError::Weights(format!("{name}: {e}")))?;
            for (tensor_name, view) in st.tensors() {
                tensors.insert(
                    tensor_name,
                    HostTensor {
                        file: name.clone(),
                        dtype: view.dtype(),
                        shape: view.shape().to_vec(),
                        bytes: view.data(),
                    },
                );
            }
        }
        Ok(WeightIndex { tensors, files })
    }
}

/// One tensor as it lies in the checkpoint.
pub struct HostTensor<'a> {
    /// The file it came from, for error messages.
    pub file: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub bytes: &'a [u8],
}

/// Every tensor of a checkpoint by name.
pub struct WeightIndex<'a> {
    tensors: HashMap<String, HostTensor<'a>>,
    /// Every checkpoint file, for error messages.
    files: String,
}

impl<'a> WeightIndex<'a> {
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// The stored dtype of the embedding table, which decides the compute dtype on GPUs.
    pub fn dtype_of(&self, name: &str) -> Option<Dtype> {
        self.tensors.get(name).map(|t| t.dtype)
    }

    /// Reads `name`, checks its shape and converts it to `target`.
    pub fn read(&self, name: &str, shape: &[usize], target: DType) -> Result<TensorData, ModelError> {
        let t = self
            .tensors
            .get(name)
            .ok_or_else(|| ModelError::Weights(format!("{}: missing tensor `{name}`", self.files)))?;
        if t.shape != shape {
            return Err(ModelError::Weights(format!(
                "{}: tensor `{name}` has shape {:?}, config.json implies {shape:?}",
                t.file, t.shape
            )));
        }
        Ok(convert(to_f32(name, t)?, shape.to_vec(), target))
    }

    /// Reads a `[rows, cols]` matrix and returns it transposed, `[cols, rows]`.
    pub fn read_transposed(
        &self,
        name: &str,
        rows: usize,
        cols: usize,
        target: DType,
    ) -> Result<TensorData, ModelError> {
        let data = self.read(name, &[rows, cols], DType::F32)?;
        let values = data
            .as_slice::<f32>()
            .map_err(|e| ModelError::Weights(format!("{name}: {e:?}")))?;
        let mut out = vec![0.0f32; rows * cols];
        for r in 0..rows {
            for (c, v) in values[r * cols..(r + 1) * cols].iter().enumerate() {
                out[c * rows + r] = *v;
            }
        }
        Ok(convert(out, vec![cols, rows], target))
    }
}

/// Sharded reads: a tensor-parallel rank converts only its own rows or columns.
impl<'a> WeightIndex<'a> {
    /// Reads `name` (a `[rows, cols]` matrix) and returns the block `row_range x col_range`,
    /// `[row_range.len(), col_range.len()]`; rows past `rows` (vocabulary padding) are zeros.
    pub fn read_block(
        &self,
        name: &str,
        [rows, cols]: [usize; 2],
        row_range: Range<usize>,
        col_range: Range<usize>,
        target: DType,
    ) -> Result<TensorData, ModelError> {
        let values = self.block_f32(name, &[rows, cols], row_range.clone(), col_range.clone())?;
        Ok(convert(values, vec![row_range.len(), col_range.len()], target))
    }

    /// As [`WeightIndex::read_block`], transposed: `[col_range.len(), row_range.len()]`.
    pub fn read_block_transposed(
        &self,
        name: &str,
        [rows, cols]: [usize; 2],
        row_range: Range<usize>,
        col_range: Range<usize>,
        target: DType,
    ) -> Result<TensorData, ModelError> {
        let values = self.block_f32(name, &[rows, cols], row_range.clone(), col_range.clone())?;
        let (r_n, c_n) = (row_range.len(), col_range.len());
        let mut out = vec![0.0f32; r_n * c_n];
        for r in 0..r_n {
            for (c, v) in values[r * c_n..(r + 1) * c_n].iter().enumerate() {
                out[c * r_n + r] = *v;
            }
        }
        Ok(convert(out, vec![c_n, r_n], target))
    }

    /// Elements `range` of the vector `name` of length `n`.
    pub fn read_range(
        &self,
        name: &str,
        n: usize,
        range: Range<usize>,
        target: DType,
    ) -> Result<TensorData, ModelError> {
        let values = self.block_f32(name, &[n], 0..1, range.clone())?;
        Ok(convert(values, vec![range.len()], target))
    }

    /// The block as f32, converting only its elements. `shape` is `[rows, cols]` or `[cols]`.
    fn block_f32(
        &self,
        name: &str,
        shape: &[usize],
        row_range: Range<usize>,
        col_range: Range<usize>,
    ) -> Result<Vec<f32>, ModelError> {
        let t = self
            .tensors
            .get(name)
            .ok_or_else(|| ModelError::Weights(format!("{}: missing tensor `{name}`", self.files)))?;
        if t.shape != shape {
            return Err(ModelError::Weights(format!(
                "{}: tensor `{name}` has shape {:?}, config.json implies {shape:?}",
                t.file, t.shape
            )));
        }
        let (rows, cols) = match *shape {
            [r, c] => (r, c),
            [c] => (1, c),
            _ => return Err(ModelError::Weights(format!("`{name}`: not a vector or matrix"))),
        };
        assert!(col_range.end <= cols, "`{name}`: columns {col_range:?} of {cols}");
        let size = match t.dtype {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::BF16 => 2,
            _ => 0,
        };
        let mut out = Vec::with_capacity(row_range.len() * col_range.len());
        for r in row_range {
            if r >= rows {
                out.extend(std::iter::repeat_n(0.0, col_range.len()));
                continue;
            }
            let start = (r * cols + col_range.start) * size;
            let end = (r * cols + col_range.end) * size;
            let part = HostTensor {
                file: String::new(),
                dtype: t.dtype,
                shape: Vec::new(),
                bytes: &t.bytes[start..end],
            };
            out.extend(to_f32(name, &part)?);
        }
        Ok(out)
    }
}

fn convert(values: Vec<f32>, shape: Vec<usize>, target: DType) -> TensorData {
    match target {
        DType::F16 => TensorData::new(values.into_iter().map(f16::from_f32).collect(), shape),
        DType::BF16 => TensorData::new(values.into_iter().map(bf16::from_f32).collect(), shape),
        _ => TensorData::new(values, shape),
    }
}

fn to_f32(name: &str, t: &HostTensor<'_>) -> Result<Vec<f32>, ModelError> {
    let chunks = |n: usize| t.bytes.chunks_exact(n);
    Ok(match t.dtype {
        Dtype::F32 => chunks(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::F16 => chunks(2)
            .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::BF16 => chunks(2)
            .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        other => {
            return Err(ModelError::Unsupported(format!(
                "tensor `{name}` is stored as {other:?} (supported: F32, F16, BF16)"
            )))
        }
    })
}
