//! Greedy rows' argmax and temperature draws (top-k, top-p and min-p included) on CUDA
//! (`kernels::sample`), installed as the
//! executor's [`DeviceArgmaxFn`] (`[cuda] device_argmax`, on by default) and [`DeviceDrawFn`]
//! (`[cuda] device_sampling = true`). Generic over the cubecl runtime like the kernels, so that
//! the tests run these hooks on wgpu's Vulkan backend.

use std::sync::Arc;

use super::cuda_fused::contiguous;
use super::output_blocks;
use burn::tensor::{DType, Int, Tensor, TensorData};
use burn_cubecl::kernel::into_contiguous;

use burn_cubecl::CubeRuntime;

use super::cuda_gemm::Cube;
use super::draw::{
    DeviceArgmaxFn, DeviceDraw, DeviceDrawFn, DeviceEditFn, DeviceLogprobsFn, EditRow, LogprobsRow,
};
use super::kernels::sample;

/// The executor's argmax hook on [`Cube`]: one cube per row, where burn's `argmax` (without
/// autotune) walks each row with one thread.
pub fn device_argmax<R: CubeRuntime>() -> DeviceArgmaxFn<Cube<R>> {
    Arc::new(|logits: Tensor<Cube<R>, 2>| {
        let [rows, vocab] = logits.dims();
        // Any float type: the head's output as it is, with no launch to cast it.
        if !logits.dtype().is_float() {
            return Err(format!("{:?} logits (the argmax reads floats)", logits.dtype()));
        }
        let logits = contiguous(logits.into_primitive().tensor(), "argmax logits");
        let dtype = logits.dtype.into();
        let ids = output_blocks::empty(&logits.client, &logits.device, [rows].into(), DType::I32);
        let handles = [logits.handle.clone(), ids.handle.clone()];
        sample::launch_argmax(&logits.client, handles, (rows, vocab), dtype).map_err(|e| e.0)?;
        Ok(Tensor::from_primitive(ids))
    })
}

/// The executor's draw hook on [`Cube`].
pub fn device_draw<R: CubeRuntime>() -> DeviceDrawFn<Cube<R>> {
    Arc::new(|logits: Tensor<Cube<R>, 2>, draws: &[DeviceDraw]| launch(logits, draws))
}

fn launch<R: CubeRuntime>(
    logits: Tensor<Cube<R>, 2>,
    draws: &[DeviceDraw],
) -> Result<Tensor<Cube<R>, 1, Int>, String> {
    let [rows, vocab] = logits.dims();
    if logits.dtype() != DType::F32 {
        return Err(format!("{:?} logits (the draw reads f32)", logits.dtype()));
    }
    if let Some(d) = draws
        .iter()
        .find(|d| d.row >= rows || d.temperature.is_nan() || d.temperature <= 0.0)
    {
        return Err(format!(
            "a draw of row {} at temperature {} from {rows} rows",
            d.row, d.temperature
        ));
    }
    let device = logits.device();
    let n = draws.len();
    let to_device = |data: TensorData| Tensor::<Cube<R>, 1, Int>::from_data(data, &device);
    let row_ids: Vec<i32> = draws.iter().map(|d| d.row as i32).collect();
    let keys: Vec<i32> = draws
        .iter()
        .flat_map(|d| [d.key as u32 as i32, (d.key >> 32) as u32 as i32])
        .collect();
    // Temperature and cuts in one upload; top-k travels as a float (exact below 2^24, far above
    // any vocabulary here).
    let params: Vec<f32> = draws
        .iter()
        .flat_map(|d| {
            [
                d.temperature,
                d.cuts.top_k.min(1 << 24) as f32,
                d.cuts.top_p,
                d.cuts.min_p,
            ]
        })
        .collect();
    let any_cuts = draws.iter().any(|d| !d.cuts.keep_all());
    let logits = contiguous(logits.into_primitive().tensor(), "draw logits");
    // Row ids and key halves travel as i32 tensors; the kernel reads their bits as u32.
    let row_ids = into_contiguous(to_device(TensorData::new(row_ids, [n])).into_primitive());
    let keys = into_contiguous(to_device(TensorData::new(keys, [2 * n])).into_primitive());
    let params = Tensor::<Cube<R>, 1>::from_data(TensorData::new(params, [4 * n]), (&device, DType::F32));
    let params = into_contiguous(params.into_primitive().tensor());
    let ids = output_blocks::empty(&logits.client, &logits.device, [n].into(), DType::I32);
    let handles = [
        logits.handle.clone(),
        row_ids.handle.clone(),
        params.handle.clone(),
        keys.handle.clone(),
        ids.handle.clone(),
    ];
    sample::launch(&logits.client, handles, (n, rows, vocab), any_cuts).map_err(|e| e.0)?;
    Ok(Tensor::from_primitive(ids))
}

/// The executor's logprobs hook on [`Cube`]: the raw logprobs of the rows whose token the
/// device chose, so that only `1 + 2 * top` floats per row come back instead of the row.
pub fn device_logprobs<R: CubeRuntime>() -> DeviceLogprobsFn<Cube<R>> {
    Arc::new(|logits, ids, rows: &[LogprobsRow], top| launch_logprobs(logits, ids, rows, top))
}

fn launch_logprobs<R: CubeRuntime>(
    logits: Tensor<Cube<R>, 2>,
    ids: Tensor<Cube<R>, 1, Int>,
    rows: &[LogprobsRow],
    top: usize,
) -> Result<Tensor<Cube<R>, 2>, String> {
    let [logits_rows, vocab] = logits.dims();
    let [ids_len] = ids.dims();
    if logits.dtype() != DType::F32 {
        return Err(format!("{:?} logits (the logprobs read f32)", logits.dtype()));
    }
    if let Some(r) = rows.iter().find(|r| r.row >= logits_rows || r.id_at >= ids_len) {
        return Err(format!(
            "logprobs of row {} with id {} of {ids_len}",
            r.row, r.id_at
        ));
    }
    let device = logits.device();
    let n = rows.len();
    let ids = contiguous(ids.into_primitive(), "logprobs ids");
    if ids.dtype != DType::I32 {
        return Err(format!("{:?} ids (the logprobs read i32)", ids.dtype));
    }
    let to_device = |v: Vec<i32>| {
        let t = Tensor::<Cube<R>, 1, Int>::from_data(TensorData::new(v, [n]), &device);
        into_contiguous(t.into_primitive())
    };
    // Row indices travel as i32 tensors; the kernel reads their bits as u32.
    let row_ids = to_device(rows.iter().map(|r| r.row as i32).collect());
    let id_at = to_device(rows.iter().map(|r| r.id_at as i32).collect());
    let logits = contiguous(logits.into_primitive().tensor(), "logprobs logits");
    // Flat, then viewed as 2-D: cubecl pads the rows of a 2-D allocation (see `llama::int_tensor`).
    let out = output_blocks::empty(
        &logits.client,
        &logits.device,
        [n * (1 + 2 * top)].into(),
        DType::F32,
    );
    let handles = [
        logits.handle.clone(),
        row_ids.handle.clone(),
        ids.handle.clone(),
        id_at.handle.clone(),
        out.handle.clone(),
    ];
    sample::launch_logprobs(&logits.client, handles, (n, logits_rows, vocab, ids_len), top)
        .map_err(|e| e.0)?;
    let out: Tensor<Cube<R>, 1> = Tensor::from_primitive(burn::tensor::TensorPrimitive::Float(out));
    Ok(out.reshape([n, 1 + 2 * top]))
}

/// The executor's logit-edit hook on [`Cube`]: edited copies of the rows that bias, the
/// `min_tokens` mask or penalties change, so that the device chooses their tokens too.
pub fn device_edit<R: CubeRuntime>() -> DeviceEditFn<Cube<R>> {
    Arc::new(launch_edits::<R>)
}

fn launch_edits<R: CubeRuntime>(
    logits: Tensor<Cube<R>, 2>,
    rows: &[EditRow<'_>],
    fed_ids: Option<&Tensor<Cube<R>, 1, Int>>,
) -> Result<Tensor<Cube<R>, 2>, String> {
    let [logits_rows, vocab] = logits.dims();
    if logits.dtype() != DType::F32 {
        return Err(format!("{:?} logits (the edits read f32)", logits.dtype()));
    }
    if let Some(r) = rows.iter().find(|r| r.row >= logits_rows) {
        return Err(format!("edits of row {} of {logits_rows}", r.row));
    }
    let fed_len = fed_ids.map_or(0, |t| t.dims()[0]);
    if let Some(at) = rows.iter().filter_map(|r| r.fed_at).find(|&at| at >= fed_len) {
        return Err(format!("a fed token at {at} of {fed_len} fed ids"));
    }
    let device = logits.device();
    let n = rows.len();
    // Offsets, kinds and ids travel as i32 tensors; the kernel reads their bits as u32.
    let mut starts = vec![0i32];
    let (mut ops, mut values) = (Vec::new(), Vec::new());
    for r in rows {
        for e in r.edits {
            let (kind, id, value) = sample::edit_parts(e);
            ops.extend([kind as i32, id as i32]);
            values.push(value);
        }
        starts.push(values.len() as i32);
    }
    let edits = values.len();
    // A launch's arrays hold one element at least.
    if edits == 0 {
        ops.extend([0, i32::MAX]);
        values.push(0.0);
    }
    let ints = |v: Vec<i32>| {
        let len = v.len();
        into_contiguous(
            Tensor::<Cube<R>, 1, Int>::from_data(TensorData::new(v, [len]), &device).into_primitive(),
        )
    };
    let row_ids = ints(rows.iter().map(|r| r.row as i32).collect());
    let fed_at = ints(
        rows.iter()
            .map(|r| r.fed_at.map_or(sample::NO_FED as i32, |at| at as i32))
            .collect(),
    );
    // A launch's arrays hold one element at least.
    let fed_ids = match fed_ids {
        Some(t) if fed_len > 0 => contiguous(t.clone().into_primitive(), "fed ids"),
        _ => ints(vec![0]),
    };
    if fed_ids.dtype != DType::I32 {
        return Err(format!("{:?} fed ids (the edits read i32)", fed_ids.dtype));
    }
    let (starts, ops) = (ints(starts), ints(ops));
    let len = values.len();
    let values = Tensor::<Cube<R>, 1>::from_data(TensorData::new(values, [len]), (&device, DType::F32));
    let values = into_contiguous(values.into_primitive().tensor());
    let logits = contiguous(logits.into_primitive().tensor(), "edited logits");
    // Flat, then viewed as 2-D: cubecl pads the rows of a 2-D allocation.
    let out = output_blocks::empty(&logits.client, &logits.device, [n * vocab].into(), DType::F32);
    let handles = [
        logits.handle.clone(),
        row_ids.handle.clone(),
        starts.handle.clone(),
        ops.handle.clone(),
        values.handle.clone(),
        fed_ids.handle.clone(),
        fed_at.handle.clone(),
        out.handle.clone(),
    ];
    let sizes = (n, logits_rows, vocab, edits, fed_len);
    sample::launch_edits(&logits.client, handles, sizes).map_err(|e| e.0)?;
    let out: Tensor<Cube<R>, 1> = Tensor::from_primitive(burn::tensor::TensorPrimitive::Float(out));
    Ok(out.reshape([n, vocab]))
}
