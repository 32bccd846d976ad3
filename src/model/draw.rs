//! The hooks that choose tokens from a step's logits where they are (on the GPU), so that only
//! token ids come back (`actors::step_output`, `sampling::row_sampling`): the argmax of greedy
//! rows, the draw of temperature rows, and the raw logprobs of the rows that ask for them.

use std::sync::Arc;

use burn::prelude::Backend;
use burn::tensor::{Int, Tensor, TensorData};

use crate::sampling::{DrawCuts, LogitEdit};

/// One row to draw: its index in the step's logits, its temperature, the warpers that cut its
/// vocabulary and its key (`sampling::row_sampling`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DeviceDraw {
    pub row: usize,
    pub temperature: f32,
    pub cuts: DrawCuts,
    pub key: u64,
}

/// Draws `sampling::device_draw` of each listed row of `logits` (`[rows, vocab]`, f32) and
/// returns the token ids, one per draw in order, still on the device; an error leaves the rows
/// to the host.
pub type DeviceDrawFn<B> =
    Arc<dyn Fn(Tensor<B, 2>, &[DeviceDraw]) -> Result<Tensor<B, 1, Int>, String> + Send + Sync>;

/// The argmax of every row of `logits` (`[rows, vocab]`, f32), still on the device, the lowest id
/// of a tie; an error leaves the rows to burn's `argmax`.
pub type DeviceArgmaxFn<B> = Arc<dyn Fn(Tensor<B, 2>) -> Result<Tensor<B, 1, Int>, String> + Send + Sync>;

/// One row whose raw logprobs to compute: its index in the step's logits and the index of its
/// chosen id in the step's ids tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogprobsRow {
    pub row: usize,
    pub id_at: usize,
}

/// `sampling::raw_logprobs` of each listed row of `logits` (`[rows, vocab]`, f32) for the id
/// `ids[id_at]` and the `top` most likely ids, as `[n, 1 + 2 * top]` f32 still on the device:
/// the logprob, then `(id, logprob)` pairs; an error leaves the rows to the host.
pub type DeviceLogprobsFn<B> = Arc<
    dyn Fn(Tensor<B, 2>, Tensor<B, 1, Int>, &[LogprobsRow], usize) -> Result<Tensor<B, 2>, String>
        + Send
        + Sync,
>;

/// One row for [`DeviceEditFn`]: its index in the step's logits, its `sampling::logit_edits`,
/// and for `*Fed*` edits (`sampling::logit_edits_fed`) where its fed token is in the fed ids.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EditRow<'a> {
    pub row: usize,
    pub edits: &'a [LogitEdit],
    pub fed_at: Option<usize>,
}

/// The listed rows of `logits` (`[rows, vocab]`, f32), each a copy with its edits applied
/// (`sampling::apply_edits`, the fed token read from `fed_ids` where a row has one), as
/// `[n, vocab]` still on the device: bias, the `min_tokens` mask and penalties; an error leaves
/// the rows to the host.
pub type DeviceEditFn<B> = Arc<
    dyn Fn(Tensor<B, 2>, &[EditRow<'_>], Option<&Tensor<B, 1, Int>>) -> Result<Tensor<B, 2>, String>
        + Send
        + Sync,
>;

/// The executor's token-choosing hooks: none (burn's `argmax`, host draws, logprobs and edits)
/// unless a backend has kernels for them (CUDA, `[cuda] device_argmax` and `device_sampling`).
pub struct DeviceSampling<B: Backend> {
    pub argmax: Option<DeviceArgmaxFn<B>>,
    pub draw: Option<DeviceDrawFn<B>>,
    pub logprobs: Option<DeviceLogprobsFn<B>>,
    pub edit: Option<DeviceEditFn<B>>,
}

impl<B: Backend> Default for DeviceSampling<B> {
    fn default() -> Self {
        Self {
            argmax: None,
            draw: None,
            logprobs: None,
            edit: None,
        }
    }
}

impl<B: Backend> Clone for DeviceSampling<B> {
    fn clone(&self) -> Self {
        Self {
            argmax: self.argmax.clone(),
            draw: self.draw.clone(),
            logprobs: self.logprobs.clone(),
            edit: self.edit.clone(),
        }
    }
}

/// [`DeviceDrawFn`] by reading the rows back and drawing on the host: the reference the device
/// hook must match, and the plumbing tests' hook on the CPU backend.
pub fn draw_on_host<B: Backend>(
    logits: Tensor<B, 2>,
    draws: &[DeviceDraw],
) -> Result<Tensor<B, 1, Int>, String> {
    let [_, vocab] = logits.dims();
    let device = logits.device();
    let values = logits.into_data().to_vec::<f32>().map_err(|e| format!("{e:?}"))?;
    let ids: Vec<i32> = draws
        .iter()
        .map(|d| {
            let row = &values[d.row * vocab..(d.row + 1) * vocab];
            crate::sampling::device_draw(row, d.temperature, d.cuts, d.key) as i32
        })
        .collect();
    let n = ids.len();
    Ok(Tensor::from_data(TensorData::new(ids, [n]), &device))
}

/// [`DeviceLogprobsFn`] by reading the rows and ids back and computing on the host: the
/// reference the device hook must match, and the plumbing tests' hook on the CPU backend.
pub fn logprobs_on_host<B: Backend>(
    logits: Tensor<B, 2>,
    ids: Tensor<B, 1, Int>,
    rows: &[LogprobsRow],
    top: usize,
) -> Result<Tensor<B, 2>, String> {
    let [_, vocab] = logits.dims();
    let device = logits.device();
    let values = logits.into_data().to_vec::<f32>().map_err(|e| format!("{e:?}"))?;
    let ids: Vec<i64> = ids.into_data().iter::<i64>().collect();
    let mut out = Vec::with_capacity(rows.len() * (1 + 2 * top));
    for r in rows {
        let id = *ids.get(r.id_at).ok_or("an id index past the ids")? as u32;
        let lp = crate::sampling::raw_logprobs(&values[r.row * vocab..(r.row + 1) * vocab], id, top);
        out.push(lp.logprob);
        out.extend(lp.top.iter().flat_map(|&(id, l)| [id as f32, l]));
    }
    Ok(Tensor::from_data(
        TensorData::new(out, [rows.len(), 1 + 2 * top]),
        &device,
    ))
}

/// [`DeviceEditFn`] by reading the rows (and the fed ids) back and editing them on the host: the
/// reference the device hook must match, and the plumbing tests' hook on the CPU backend.
pub fn edit_on_host<B: Backend>(
    logits: Tensor<B, 2>,
    rows: &[EditRow<'_>],
    fed_ids: Option<&Tensor<B, 1, Int>>,
) -> Result<Tensor<B, 2>, String> {
    let [_, vocab] = logits.dims();
    let device = logits.device();
    let values = logits.into_data().to_vec::<f32>().map_err(|e| format!("{e:?}"))?;
    let fed_ids: Vec<i64> = fed_ids.map_or_else(Vec::new, |t| t.clone().into_data().iter::<i64>().collect());
    let mut out = Vec::with_capacity(rows.len() * vocab);
    for r in rows {
        let fed = match r.fed_at {
            None => None,
            Some(at) => Some(*fed_ids.get(at).ok_or("a fed id index past the fed ids")? as u32),
        };
        let mut w = values[r.row * vocab..(r.row + 1) * vocab].to_vec();
        crate::sampling::apply_edits(&mut w, r.edits, fed);
        out.extend(w);
    }
    Ok(Tensor::from_data(
        TensorData::new(out, [rows.len(), vocab]),
        &device,
    ))
}
