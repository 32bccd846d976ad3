//! `device_check gemm`: every kernel of `inferflux::model::cuda_gemm` on a model's projection
//! shapes, with both weight layouts, at decode-sized row counts. Each result is checked against
//! an f32 product on the CPU (of the same half-precision inputs) before it is timed, and a kernel
//! that cubek refuses is listed as such. The summary is what `[cuda] gemv` / `[cuda] gemm`
//! should be: per row count and layout, the kernel with the least GEMM time per decode step
//! (every layer's projections plus `lm_head`).
//!
//! ```text
//! device_check gemm [--device cuda|cpu] [--model DIR] [--rows 1,8,32,128] [--kernels all|burn,...]
//!     [--layouts in_out,out_in] [--iters 20] [--budget-s 120] [--json FILE] [--recommend FILE]
//! ```
//!
//! Without `--model` the shapes are Llama-3.2-1B's. `--device cpu` is a dry run of the benchmark
//! itself (burn's matmul on Flex in f32; every other kernel refused). `--budget-s` stops starting new problems
//! after that many seconds (NVRTC compiles each new kernel once), printing what it measured;
//! row counts run in the order given, so the first ones always complete.

use std::collections::BTreeMap;
use std::time::Instant;

use burn::prelude::*;
use burn::tensor::{DType, TensorData};
use inferflux::model::cuda_gemm::{self, CudaCube, GemmKernel};
use inferflux::model::{ModelFiles, ModelSource, WeightLayout};

type Cpu = burn::backend::Flex;

/// One projection shape: `x [m, k] · w [k, n]`, `per_step` times in a decode step.
struct Shape {
    name: &'static str,
    k: usize,
    n: usize,
    per_step: usize,
}

/// A weight's f32 values (for the CPU reference) and its device copy in each layout asked for.
type Weight<B> = (Vec<f32>, Vec<Tensor<B, 2>>);

/// Runs one kernel on one backend's tensors.
type KernelFn<B> =
    dyn Fn(GemmKernel, Tensor<B, 2>, Tensor<B, 2>) -> Result<Tensor<B, 2>, cuda_gemm::GemmError>;

#[derive(serde::Serialize)]
struct Measured {
    shape: &'static str,
    k: usize,
    n: usize,
    rows: usize,
    layout: &'static str,
    kernel: &'static str,
    /// `None` when the kernel refused the problem or its result was wrong.
    us: Option<f64>,
    gbs: Option<f64>,
    max_rel_err: Option<f64>,
    status: String,
}

struct Args {
    cuda: bool,
    model: Option<String>,
    rows: Vec<usize>,
    kernels: Vec<GemmKernel>,
    layouts: Vec<WeightLayout>,
    iters: usize,
    budget_s: f64,
    json: Option<String>,
    recommend: Option<String>,
}

fn parse(mut it: impl Iterator<Item = String>) -> Args {
    let mut a = Args {
        cuda: true,
        model: None,
        rows: vec![1, 8, 32, 128],
        // `cmma` is what `burn` launches; listed only when asked for.
        kernels: GemmKernel::ALL
            .into_iter()
            .filter(|k| *k != GemmKernel::Cmma)
            .collect(),
        layouts: vec![WeightLayout::InOut, WeightLayout::OutIn],
        iters: 20,
        budget_s: 120.0,
        json: None,
        recommend: None,
    };
    let list = |v: String| v.split(',').map(str::to_string).collect::<Vec<_>>();
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--model" => a.model = Some(value()),
            "--device" => a.cuda = value() != "cpu",
            "--rows" => {
                a.rows = list(value())
                    .iter()
                    .map(|r| r.parse().expect("--rows 1,8"))
                    .collect()
            }
            "--kernels" => {
                let v = value();
                if v != "all" {
                    a.kernels = list(v)
                        .iter()
                        .map(|k| k.parse().unwrap_or_else(|e| panic!("{e}")))
                        .collect();
                }
            }
            "--layouts" => {
                a.layouts = list(value())
                    .iter()
                    .map(|l| match l.as_str() {
                        "in_out" => WeightLayout::InOut,
                        "out_in" => WeightLayout::OutIn,
                        other => panic!("unknown layout {other} (in_out, out_in)"),
                    })
                    .collect()
            }
            "--iters" => a.iters = value().parse().expect("--iters N"),
            "--budget-s" => a.budget_s = value().parse().expect("--budget-s S"),
            "--json" => a.json = Some(value()),
            "--recommend" => a.recommend = Some(value()),
            other => panic!("unknown argument {other}"),
        }
    }
    a
}

fn layout_name(layout: WeightLayout) -> &'static str {
    match layout {
        WeightLayout::InOut => "in_out",
        WeightLayout::OutIn => "out_in",
    }
}

/// The projections of one decode step: (name, in, out, times per step).
fn shapes(model: Option<&str>) -> (Vec<Shape>, DType) {
    let (h, q, kv, inter, vocab, layers, dtype) = match model {
        None => (2048, 2048, 512, 8192, 128_256, 16, DType::BF16),
        Some(dir) => {
            let files = ModelFiles::open(&ModelSource::Dir(dir.into())).expect("model opens");
            let c = &files.config;
            let index = files.checkpoint.index().expect("weights index");
            let dtype = match index.dtype_of("model.embed_tokens.weight") {
                Some(safetensors::Dtype::BF16) => DType::BF16,
                _ => DType::F16,
            };
            let hd = c.head_dim;
            (
                c.hidden_size,
                c.num_heads * hd,
                c.num_kv_heads * hd,
                c.intermediate_size,
                c.vocab_size,
                c.num_layers,
                dtype,
            )
        }
    };
    let s = |name, k, n, per_step| Shape { name, k, n, per_step };
    (
        vec![
            s("q", h, q, layers),
            s("k,v", h, kv, 2 * layers),
            s("o", q, h, layers),
            // One product for both, as the fused ops serve them (`[cuda] fused_ops`, the default).
            s("gate+up", h, 2 * inter, layers),
            s("down", inter, h, layers),
            s("lm_head", h, vocab, 1),
        ],
        dtype,
    )
}

/// Deterministic values in [-1, 1) scaled by `scale` (no RNG crate needed, same every run).
fn values(len: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ((state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

/// `values` rounded to `dtype` (what the device holds), back in f32.
fn rounded(v: Vec<f32>, shape: [usize; 2], dtype: DType) -> Vec<f32> {
    TensorData::new(v, shape)
        .convert_dtype(dtype)
        .convert::<f32>()
        .to_vec::<f32>()
        .expect("f32 values")
}

fn to_device<B: Backend>(v: &[f32], shape: [usize; 2], dtype: DType, device: &B::Device) -> Tensor<B, 2> {
    Tensor::from_data(
        TensorData::new(v.to_vec(), shape).convert_dtype(dtype),
        (device, dtype),
    )
}

pub fn main(argv: impl Iterator<Item = String>) {
    let args = parse(argv);
    let (shapes, dtype) = shapes(args.model.as_deref());
    let results = if args.cuda {
        run::<CudaCube>(&args, &shapes, dtype, &cuda_gemm::matmul)
    } else {
        // A dry run of the benchmark itself: burn's matmul on the CPU in f32, the rest refused.
        let cpu = |kernel, x: Tensor<Cpu, 2>, w: Tensor<Cpu, 2>| match kernel {
            GemmKernel::Burn => Ok(x.matmul(w)),
            kernel => Err(cuda_gemm::GemmError::Unavailable {
                kernel,
                why: "CUDA only".into(),
            }),
        };
        run::<Cpu>(&args, &shapes, DType::F32, &cpu)
    };
    let best = summary(&results, &shapes, &args);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&results).unwrap()).expect("write --json");
    }
    if let (Some(path), Some(env)) = (&args.recommend, best) {
        std::fs::write(path, env).expect("write --recommend");
    }
}

/// Checks and times every kernel of `args` on every shape, row count and layout, in that
/// order of importance, within the time budget.
fn run<B: Backend>(args: &Args, shapes: &[Shape], dtype: DType, gemm: &KernelFn<B>) -> Vec<Measured> {
    let started = Instant::now();
    let device = Default::default();
    let sync = || B::sync(&device).expect("device sync");
    let mut results: Vec<Measured> = Vec::new();
    // Weights are made once per shape and layout (lm_head is the largest: 0.5 GB in bf16).
    let mut weights: BTreeMap<(usize, usize), Weight<B>> = BTreeMap::new();
    println!("| rows | layout | shape | k x n | kernel | µs | GB/s | max rel err | status |");
    println!("|---:|---|---|---|---|---:|---:|---:|---|");
    'rows: for &m in &args.rows {
        for (li, &layout) in args.layouts.iter().enumerate() {
            for (si, shape) in shapes.iter().enumerate() {
                if started.elapsed().as_secs_f64() > args.budget_s {
                    println!("(budget of {} s spent: stopped before {m} rows)", args.budget_s);
                    break 'rows;
                }
                let (k, n) = (shape.k, shape.n);
                let (w_host, w_dev) = weights.entry((k, n)).or_insert_with(|| {
                    let w = rounded(
                        values(k * n, (k * 31 + n) as u64, 1.0 / (k as f32).sqrt()),
                        [k, n],
                        dtype,
                    );
                    let mut transposed = vec![0.0f32; k * n];
                    for r in 0..k {
                        for c in 0..n {
                            transposed[c * k + r] = w[r * n + c];
                        }
                    }
                    let devs = args
                        .layouts
                        .iter()
                        .map(|l| match l {
                            WeightLayout::InOut => to_device::<B>(&w, [k, n], dtype, &device),
                            WeightLayout::OutIn => {
                                to_device::<B>(&transposed, [n, k], dtype, &device).transpose()
                            }
                        })
                        .collect();
                    (w, devs)
                });
                let x_host = rounded(values(m * k, (m * 7 + si) as u64, 1.0), [m, k], dtype);
                let reference =
                    Tensor::<Cpu, 2>::from_data(TensorData::new(x_host.clone(), [m, k]), &Default::default())
                        .matmul(Tensor::from_data(
                            TensorData::new(w_host.clone(), [k, n]),
                            &Default::default(),
                        ))
                        .into_data()
                        .to_vec::<f32>()
                        .expect("f32 reference");
                let ref_max = reference.iter().fold(0.0f32, |a, v| a.max(v.abs())).max(1e-6);
                let x = to_device::<B>(&x_host, [m, k], dtype, &device);
                let w = w_dev[li].clone();
                for &kernel in &args.kernels {
                    // A kernel that fails only when its result is read (a launch error surfaces
                    // at the next synchronisation) must not end the run either.
                    let checked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        gemm(kernel, x.clone(), w.clone()).map(|out| {
                            let got = out
                                .cast(DType::F32)
                                .into_data()
                                .to_vec::<f32>()
                                .expect("f32 result");
                            got.iter()
                                .zip(&reference)
                                .fold(0.0f32, |a, (g, r)| a.max((g - r).abs()))
                                / ref_max
                        })
                    }))
                    .unwrap_or_else(|_| {
                        Err(cuda_gemm::GemmError::Panicked {
                            kernel,
                            why: "while reading the result back".into(),
                        })
                    });
                    let (us, err, status) = match checked {
                        Err(e) => (
                            None,
                            None,
                            format!("refused: {}", e.to_string().chars().take(80).collect::<String>()),
                        ),
                        // Half-precision inputs, f32 accumulation: a few output ulps at most.
                        Ok(err) if err.is_nan() || err >= 2e-2 => {
                            (None, Some(err as f64), "WRONG".to_string())
                        }
                        Ok(err) => {
                            let mut sink = None;
                            for _ in 0..2 {
                                sink = gemm(kernel, x.clone(), w.clone()).ok();
                            }
                            sync();
                            let t = Instant::now();
                            for _ in 0..args.iters {
                                sink = gemm(kernel, x.clone(), w.clone()).ok();
                            }
                            sync();
                            drop(sink);
                            (
                                Some(t.elapsed().as_secs_f64() * 1e6 / args.iters as f64),
                                Some(err as f64),
                                "ok".into(),
                            )
                        }
                    };
                    let bytes = ((k * n + m * k + m * n) * dtype.size()) as f64;
                    let gbs = us.map(|us| bytes / (us * 1e-6) / 1e9);
                    let cell = |v: Option<f64>, p: usize| v.map_or("-".into(), |v| format!("{v:.p$}"));
                    println!(
                        "| {m} | {} | {} | {k} x {n} | {kernel} | {} | {} | {} | {status} |",
                        layout_name(layout),
                        shape.name,
                        cell(us, 1),
                        cell(gbs, 0),
                        err.map_or("-".into(), |e| format!("{e:.1e}")),
                    );
                    results.push(Measured {
                        shape: shape.name,
                        k,
                        n,
                        rows: m,
                        layout: layout_name(layout),
                        kernel: kernel.name(),
                        us,
                        gbs,
                        max_rel_err: err,
                        status,
                    });
                }
            }
        }
    }
    results
}

/// Prints, per row count and layout, each kernel's GEMM time per decode step where it ran every
/// shape, and returns the `INFERFLUX__CUDA__*` settings of the best choice: the fastest layout
/// at the smallest row count; in that layout, the fastest kernel at that row count (`gemv`), kept
/// up to the largest count where it is still the fastest (`gemv_max_rows`), and the fastest over
/// the larger counts measured (`gemm`).
fn summary(results: &[Measured], shapes: &[Shape], args: &Args) -> Option<String> {
    println!("\nGEMM time per decode step (every layer's projections + lm_head), ms:\n");
    println!("| rows | layout | kernel | ms/step | vs burn in_out |");
    println!("|---:|---|---|---:|---:|");
    let step_ms = |m: usize, layout: &str, kernel: &str| -> Option<f64> {
        shapes
            .iter()
            .map(|s| {
                results
                    .iter()
                    .find(|r| {
                        r.rows == m
                            && r.layout == layout
                            && r.kernel == kernel
                            && r.k == s.k
                            && r.n == s.n
                            && r.shape == s.name
                    })
                    .and_then(|r| r.us)
                    .map(|us| us * s.per_step as f64 / 1e3)
            })
            .sum()
    };
    let mut best_per_rows: Vec<(usize, &'static str, &'static str, f64)> = Vec::new();
    for &m in &args.rows {
        let base = step_ms(m, "in_out", "burn");
        let mut best: Option<(&'static str, &'static str, f64)> = None;
        for &layout in &args.layouts {
            let layout = layout_name(layout);
            for &kernel in &args.kernels {
                let Some(ms) = step_ms(m, layout, kernel.name()) else {
                    continue;
                };
                let ratio = base.map_or("-".into(), |b| format!("{:.2}x", b / ms));
                println!("| {m} | {layout} | {kernel} | {ms:.2} | {ratio} |");
                if best.is_none_or(|b| ms < b.2) {
                    best = Some((layout, kernel.name(), ms));
                }
            }
        }
        if let Some((layout, kernel, ms)) = best {
            println!("| {m} | **{layout}** | **{kernel}** | **{ms:.2}** | best |");
            best_per_rows.push((m, layout, kernel, ms));
        }
    }
    let (_, layout, _, _) = *best_per_rows.first()?;
    // Both kernels run in that one layout; each is the least total over its row counts.
    let mut measured: Vec<usize> = args
        .rows
        .iter()
        .copied()
        .filter(|&m| results.iter().any(|r| r.rows == m))
        .collect();
    measured.sort_unstable();
    // The small-rows kernel is the fastest at the smallest row count; it keeps the rows up to
    // the last count (in a run from the smallest) where it is still the fastest.
    let fastest_at = |m: usize| {
        args.kernels
            .iter()
            .filter_map(|k| step_ms(m, layout, k.name()).map(|t| (k.name(), t)))
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .map(|(k, _)| k)
    };
    let first = *measured.first()?;
    let small_kernel = fastest_at(first);
    let small_max = measured
        .iter()
        .copied()
        .take_while(|&m| fastest_at(m) == small_kernel)
        .last()
        .unwrap_or(first);
    let pick = |small: bool| {
        let rows: Vec<usize> = measured
            .iter()
            .copied()
            .filter(|&m| (m <= small_max) == small)
            .collect();
        args.kernels
            .iter()
            .filter_map(|k| {
                let total: Option<f64> = rows.iter().map(|&m| step_ms(m, layout, k.name())).sum();
                total.filter(|_| !rows.is_empty()).map(|t| (k.name(), t))
            })
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .map(|(k, _)| k)
    };
    let gemv = pick(true).unwrap_or("burn");
    // With no larger count measured, the small-rows kernel takes every size.
    let gemm = pick(false).unwrap_or(gemv);
    let env = format!(
        "INFERFLUX__CUDA__WEIGHT_LAYOUT={layout}\nINFERFLUX__CUDA__GEMV={gemv}\nINFERFLUX__CUDA__GEMV_MAX_ROWS={small_max}\nINFERFLUX__CUDA__GEMM={gemm}\n"
    );
    println!("\nrecommended:\n{env}");
    Some(env)
}
