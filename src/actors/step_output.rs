//! What a step brings back from the device: a token id for every row the device can choose
//! (the argmax of a greedy row, by the [`DeviceSampling`] argmax hook where one is set, as on
//! CUDA, else burn's; the draw of a temperature row, top-k/top-p/min-p included, when a draw
//! hook is set; for a row with bias, penalties or an active `min_tokens`, from a copy the edit
//! hook edited), their raw logprobs when asked and a logprobs hook is set, and the full f32
//! logits only of the rows the host must sample.
//!
//! Why: at 128 sequences and a 128,256-token vocabulary the whole logits matrix is 65 MB per
//! step, and a host walk over 16M floats; with every hook set (CUDA with `device_sampling`) no
//! row needs it.

use std::sync::atomic::{AtomicBool, Ordering};

use burn::prelude::Backend;
use burn::tensor::{DType, Int, Tensor, TensorData};

use crate::model::draw::{DeviceDraw, DeviceSampling, EditRow, LogprobsRow};
use crate::sampling::{LogitEdit, RowSampling, SampledLogprobs};

/// A step's logits as the host receives them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepOutput {
    /// Values per logits row (the vocabulary size).
    pub vocab: usize,
    /// Per logits row, in row order: the token the device chose, `None` for a row whose logits
    /// are in `host_rows`.
    pub device: Vec<Option<u32>>,
    /// Per logits row: the logprobs the device computed for a `device` row that asked for them.
    pub logprobs: Vec<Option<SampledLogprobs>>,
    /// The f32 logits of the `None` rows of `device`, in row order, `vocab` values each.
    pub host_rows: Vec<f32>,
}

impl StepOutput {
    /// Splits `logits` (`[rows, vocab]`, of any float type: the argmax reads them as they are,
    /// everything else an f32 copy cast once, and only where a row needs it) by `plan` (one per
    /// row) and `edits` (per row,
    /// `sampling::logit_edits`; a row past the slice has none). Without a draw hook, or when it
    /// fails, `DeviceDraw` rows go to the host; so do device rows that ask for logprobs without
    /// a logprobs hook, or when it fails, and rows with edits without an edit hook, or when it
    /// fails (the others choose from edited copies); a failed argmax hook leaves the argmax to
    /// burn (warned once). Reads back only what is needed (one read of the ids for both kinds of
    /// device rows, one of their logprobs): no device argmax when no row is greedy, no row copy
    /// when none is the host's. The device's argmax keeps the lowest index of equal maxima, as
    /// `sampling::argmax` does: burn's on Flex (tested), cubek-reduce's `ArgMax` (as documented)
    /// and our kernel on CUDA (tested on wgpu); its reduction order, a NaN or an all `-inf` row
    /// may still pick another index there than the host would. An id outside the vocabulary
    /// fails the step.
    pub fn read<B: Backend>(
        logits: Tensor<B, 2>,
        plan: &[RowSampling],
        edits: &[Vec<LogitEdit>],
        hooks: &DeviceSampling<B>,
    ) -> Result<Self, String> {
        UnreadOutput::issue(logits, plan, edits, None, hooks)?.read()
    }
}

/// Where the fed tokens of a step's `*Fed*` edits are (`sampling::logit_edits_fed`): the ids
/// the previous step chose, still on the device, and per logits row the index of its fed token
/// in them (for the rows whose edits have `*Fed*` edits).
pub struct FedEdits<'a, B: Backend> {
    pub ids: &'a Tensor<B, 1, Int>,
    pub at: &'a [Option<usize>],
}

// Two references: copied whatever `B` is (a derive would ask `B: Copy`).
impl<B: Backend> Clone for FedEdits<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<B: Backend> Copy for FedEdits<'_, B> {}

/// A step's output with every device operation queued and nothing read back yet: what
/// [`StepOutput::read`] reads. Kept unread, it lets the executor queue the next step first,
/// whose fed-back decode inputs it takes from [`UnreadOutput::device_ids`] (async scheduling).
pub struct UnreadOutput<B: Backend> {
    vocab: usize,
    /// The ids the device chose, in the order `id_at` indexes.
    ids: Option<Tensor<B, 1, Int>>,
    /// Per logits row: where its id is in `ids`, for the rows whose token the device chose.
    id_at: Vec<Option<usize>>,
    /// The rows asking for logprobs that the device computed them for, with their top count.
    asking: Vec<(LogprobsRow, usize)>,
    top: usize,
    logprobs: Option<Tensor<B, 2>>,
    /// The logits rows the host samples.
    host: Option<Tensor<B, 2>>,
}

impl<B: Backend> UnreadOutput<B> {
    /// Queues what [`StepOutput::read`] reads (see there), reading nothing. `fed` gives the
    /// device the fed tokens of rows with `*Fed*` edits; the host samples such a row with the
    /// token it reads back from the previous step.
    pub fn issue(
        logits: Tensor<B, 2>,
        plan: &[RowSampling],
        edits: &[Vec<LogitEdit>],
        fed: Option<FedEdits<'_, B>>,
        hooks: &DeviceSampling<B>,
    ) -> Result<Self, String> {
        let [rows, vocab] = logits.dims();
        if plan.len() != rows {
            return Err(format!(
                "step has {rows} logits rows but {} sampling plans",
                plan.len()
            ));
        }
        let device = logits.device();
        // The head's output in the model's type: the argmax reads it as it is; the draws, the
        // edits, the logprobs and the host read an f32 copy, cast at the first that asks (so a
        // greedy step launches no cast).
        let raw = logits;
        let cast = std::cell::OnceCell::new();
        let logits = || -> Tensor<B, 2> {
            cast.get_or_init(|| match raw.dtype() {
                DType::F32 => raw.clone(),
                _ => raw.clone().cast(DType::F32),
            })
            .clone()
        };
        let edits_of = |r: usize| edits.get(r).map_or(&[][..], |e| &e[..]);
        let on_device_plan = |r: usize| plan[r] != RowSampling::Host;
        // Rows whose logits bias, the `min_tokens` mask or penalties change: chosen from edited
        // copies (row `i` of them is `edited_rows[i]`) by the edit hook, else on the host.
        let edited_rows: Vec<usize> = (0..rows)
            .filter(|&r| on_device_plan(r) && !edits_of(r).is_empty())
            .collect();
        let edited = match (&hooks.edit, edited_rows.is_empty()) {
            (Some(f), false) => {
                let fed_at = |r: usize| fed.and_then(|f| f.at.get(r).copied().flatten());
                let list: Vec<EditRow<'_>> = edited_rows
                    .iter()
                    .map(|&row| EditRow {
                        row,
                        edits: edits_of(row),
                        fed_at: fed_at(row),
                    })
                    .collect();
                f(logits(), &list, fed.map(|f| f.ids))
                    .inspect_err(
                        |e| tracing::warn!(error = %e, "device logit edits failed: the host samples those rows"),
                    )
                    .ok()
            }
            _ => None,
        };
        // Every read is issued before any is awaited, so a device can run them together.
        let mut chosen = Chosen {
            segments: Vec::new(),
            len: 0,
            id_at: vec![None; rows],
        };
        let unedited: Vec<(usize, usize)> = (0..rows)
            .filter(|&r| on_device_plan(r) && edits_of(r).is_empty())
            .map(|r| (r, r))
            .collect();
        chosen.choose((&raw, logits), &unedited, plan, hooks);
        if let Some(edited) = &edited {
            let members: Vec<(usize, usize)> = edited_rows.iter().enumerate().map(|(i, &r)| (r, i)).collect();
            chosen.choose((edited, || edited.clone()), &members, plan, hooks);
        }
        let Chosen {
            mut segments, id_at, ..
        } = chosen;
        let ids = match segments.len() {
            0 => None,
            1 => segments.pop(),
            _ => Some(Tensor::cat(segments, 0)),
        };
        // The logprobs of the device rows that ask for them, from their raw logits, by the hook,
        // for the top count the most demanding row asks (the others keep the head of it).
        let asking: Vec<LogprobsRow> = plan
            .iter()
            .zip(&id_at)
            .enumerate()
            .filter_map(|(row, (p, at))| {
                Some(LogprobsRow { row, id_at: (*at)? }).filter(|_| p.logprobs().is_some())
            })
            .collect();
        let top = plan.iter().filter_map(RowSampling::logprobs).max().unwrap_or(0);
        let logprobs = match (&hooks.logprobs, &ids, asking.is_empty()) {
            (Some(f), Some(ids), false) => f(logits(), ids.clone(), &asking, top)
                .inspect_err(
                    |e| tracing::warn!(error = %e, "device logprobs failed: the host samples those rows"),
                )
                .ok(),
            _ => None,
        };
        let on_device = |r: usize| id_at[r].is_some() && (plan[r].logprobs().is_none() || logprobs.is_some());
        let on_host: Vec<i32> = (0..rows).filter(|&r| !on_device(r)).map(|r| r as i32).collect();
        let host = match on_host.len() {
            0 => None,
            n if n == rows => Some(logits()),
            n => {
                let idx = Tensor::<B, 1, Int>::from_data(TensorData::new(on_host, [n]), &device);
                Some(logits().select(0, idx))
            }
        };
        let id_at = (0..rows).map(|r| id_at[r].filter(|_| on_device(r))).collect();
        let asking = asking
            .into_iter()
            .map(|a| {
                let k = plan[a.row].logprobs().unwrap_or(0);
                (a, k)
            })
            .filter(|_| logprobs.is_some())
            .collect();
        Ok(Self {
            vocab,
            ids,
            id_at,
            asking,
            top,
            logprobs,
            host,
        })
    }

    /// The ids the device chose, still on the device.
    pub fn device_ids(&self) -> Option<&Tensor<B, 1, Int>> {
        self.ids.as_ref()
    }

    /// Where logits row `row`'s id is in [`Self::device_ids`]; `None` for a row the host samples.
    pub fn device_id_at(&self, row: usize) -> Option<usize> {
        self.id_at.get(row).copied().flatten()
    }

    /// Reads the step's output back: waits for the device to finish the step.
    pub fn read(self) -> Result<StepOutput, String> {
        let Self {
            vocab,
            ids,
            id_at,
            asking,
            top,
            logprobs,
            host,
        } = self;
        let rows = id_at.len();
        let ids: Vec<i64> = ids.map_or_else(Vec::new, |t| t.into_data().iter::<i64>().collect());
        let checked = |at: usize| match ids.get(at) {
            Some(&id) if (0..vocab as i64).contains(&id) => Ok(Some(id as u32)),
            Some(&id) => Err(format!("the device chose id {id} for a vocabulary of {vocab}")),
            None => Err("the device returned too few ids".to_string()),
        };
        let device_ids = id_at
            .iter()
            .map(|at| at.map_or(Ok(None), checked))
            .collect::<Result<_, _>>()?;
        let mut row_logprobs = vec![None; rows];
        if let Some(t) = logprobs {
            let values = t.into_data().to_vec::<f32>().map_err(|e| format!("{e:?}"))?;
            for ((a, k), v) in asking.iter().zip(values.chunks_exact(1 + 2 * top)) {
                let k = *k;
                row_logprobs[a.row] = Some(SampledLogprobs {
                    logprob: v[0],
                    top: v[1..1 + 2 * k]
                        .chunks_exact(2)
                        .map(|p| (p[0] as u32, p[1]))
                        .collect(),
                });
            }
        }
        let host_rows = match host {
            None => Vec::new(),
            Some(t) => t.into_data().to_vec::<f32>().map_err(|e| format!("{e:?}"))?,
        };
        Ok(StepOutput {
            vocab,
            device: device_ids,
            logprobs: row_logprobs,
            host_rows,
        })
    }
}

/// The ids the device chose, still on the device: segments to concatenate, and where each row's
/// id is in them.
struct Chosen<B: Backend> {
    segments: Vec<Tensor<B, 1, Int>>,
    len: usize,
    id_at: Vec<Option<usize>>,
}

impl<B: Backend> Chosen<B> {
    /// Chooses the tokens of `members` (`(row, its row in src)`) from `src`: the argmax of the
    /// greedy ones (one id per row of `src`: the hook's, or burn's when there is none or it
    /// fails, warned once), then the draws of the temperature ones, from `src` in f32
    /// (`src_f32`), when a draw hook is set and succeeds.
    fn choose(
        &mut self,
        (src, src_f32): (&Tensor<B, 2>, impl FnOnce() -> Tensor<B, 2>),
        members: &[(usize, usize)],
        plan: &[RowSampling],
        hooks: &DeviceSampling<B>,
    ) {
        let greedy: Vec<(usize, usize)> = members
            .iter()
            .copied()
            .filter(|&(r, _)| matches!(plan[r], RowSampling::DeviceArgmax { .. }))
            .collect();
        if !greedy.is_empty() {
            let [src_rows, _] = src.dims();
            let by_hook = hooks.argmax.as_ref().and_then(|f| {
                f(src.clone())
                    .inspect_err(|e| {
                        // Every greedy step would fail the same way: said once.
                        static WARNED: AtomicBool = AtomicBool::new(false);
                        if !WARNED.swap(true, Ordering::Relaxed) {
                            tracing::warn!(error = %e, "device argmax failed: burn's argmax runs it");
                        }
                    })
                    .ok()
            });
            self.segments
                .push(by_hook.unwrap_or_else(|| src.clone().argmax(1).reshape([src_rows])));
            for (r, local) in greedy {
                self.id_at[r] = Some(self.len + local);
            }
            self.len += src_rows;
        }
        let (drawn, draws): (Vec<usize>, Vec<DeviceDraw>) = members
            .iter()
            .filter_map(|&(r, local)| match plan[r] {
                RowSampling::DeviceDraw {
                    temperature,
                    cuts,
                    key,
                    ..
                } => Some((
                    r,
                    DeviceDraw {
                        row: local,
                        temperature,
                        cuts,
                        key,
                    },
                )),
                _ => None,
            })
            .unzip();
        let Some(f) = hooks.draw.as_ref().filter(|_| !draws.is_empty()) else {
            return;
        };
        match f(src_f32(), &draws) {
            Ok(ids) => {
                for (k, r) in drawn.into_iter().enumerate() {
                    self.id_at[r] = Some(self.len + k);
                }
                self.segments.push(ids);
                self.len += draws.len();
            }
            Err(e) => tracing::warn!(error = %e, "device draw failed: the host samples those rows"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::draw::{DeviceArgmaxFn, DeviceDrawFn};
    use crate::sampling;
    use burn::backend::Flex;

    fn no_hooks() -> DeviceSampling<Flex> {
        DeviceSampling::default()
    }

    fn tensor(rows: &[Vec<f32>]) -> Tensor<Flex, 2> {
        let vocab = rows[0].len();
        let flat: Vec<f32> = rows.concat();
        Tensor::from_data(TensorData::new(flat, [rows.len(), vocab]), &Default::default())
    }

    /// Rows with tied maxima, short (Flex's scalar scan) and long (its SIMD max, then a search).
    fn tied_rows(vocab: usize) -> Vec<Vec<f32>> {
        let base: Vec<f32> = (0..vocab)
            .map(|i| ((i * 7919) % 113) as f32 / 10.0 - 5.0)
            .collect();
        let mut rows = Vec::new();
        for &(a, b) in &[
            (0, vocab - 1),
            (3, 4),
            (vocab / 2, vocab / 2 + 1),
            (vocab - 2, vocab - 1),
            (1, vocab / 3),
        ] {
            let mut r = base.clone();
            r[a] = 50.0;
            r[b] = 50.0;
            rows.push(r);
        }
        // Every value equal; and -0.0 tied with 0.0 as the maximum.
        rows.push(vec![1.5; vocab]);
        let mut zeros = vec![-1.0; vocab];
        zeros[2] = -0.0;
        zeros[vocab - 1] = 0.0;
        rows.push(zeros);
        rows
    }

    #[test]
    fn sampling_device_argmax_breaks_ties_as_the_host_argmax() {
        for vocab in [8, 300, 511, 512, 4096, 128_256] {
            let rows = tied_rows(vocab);
            let out = StepOutput::read(
                tensor(&rows),
                &vec![RowSampling::GREEDY; rows.len()],
                &[],
                &no_hooks(),
            )
            .unwrap();
            for (i, (row, got)) in rows.iter().zip(&out.device).enumerate() {
                assert_eq!(
                    *got,
                    Some(sampling::argmax(row)),
                    "vocab {vocab} row {i}: the device and the host pick different maxima"
                );
            }
            assert!(out.host_rows.is_empty());
        }
    }

    #[test]
    fn sampling_step_output_brings_back_only_host_rows() {
        let rows: Vec<Vec<f32>> = (0..5)
            .map(|r| (0..600).map(|i| ((i * 31 + r * 17) % 97) as f32 * 0.1).collect())
            .collect();
        let flags = [false, true, false, true, true];
        let plan = |host: &[bool]| -> Vec<RowSampling> {
            host.iter()
                .map(|&h| if h { RowSampling::Host } else { RowSampling::GREEDY })
                .collect()
        };
        let out = StepOutput::read(tensor(&rows), &plan(&flags), &[], &no_hooks()).unwrap();
        assert_eq!(out.vocab, 600);
        let want_ids: Vec<Option<u32>> = rows
            .iter()
            .zip(flags)
            .map(|(r, host)| (!host).then(|| sampling::argmax(r)))
            .collect();
        assert_eq!(out.device, want_ids);
        assert_eq!(out.host_rows, [&rows[1][..], &rows[3], &rows[4]].concat());

        let all = StepOutput::read(tensor(&rows), &plan(&[true; 5]), &[], &no_hooks()).unwrap();
        assert_eq!(all.device, vec![None; 5]);
        assert_eq!(all.host_rows, rows.concat());

        let none = StepOutput::read(tensor(&rows), &plan(&[false; 5]), &[], &no_hooks()).unwrap();
        assert!(none.host_rows.is_empty());
        assert!(none.device.iter().all(Option::is_some));

        assert!(StepOutput::read(tensor(&rows), &plan(&[false; 4]), &[], &no_hooks()).is_err());
    }

    #[test]
    fn sampling_step_output_draws_temperature_rows_through_the_hook() {
        use crate::model::draw::draw_on_host;
        use crate::sampling::DrawCuts;
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Arc;
        let rows: Vec<Vec<f32>> = (0..5)
            .map(|r| {
                (0..300)
                    .map(|i| ((i * 13 + r * 29) % 101) as f32 * 0.05)
                    .collect()
            })
            .collect();
        let draw = |key| RowSampling::DeviceDraw {
            temperature: 0.9,
            cuts: DrawCuts::NONE,
            key,
            logprobs: None,
        };
        // A top-k/top-p draw: its cuts reach the hook.
        let cuts = DrawCuts {
            top_k: 20,
            top_p: 0.5,
            min_p: 0.0,
        };
        let plan = [
            RowSampling::Host,
            draw(7),
            RowSampling::GREEDY,
            RowSampling::DeviceDraw {
                temperature: 0.9,
                cuts,
                key: 8,
                logprobs: None,
            },
            RowSampling::Host,
        ];
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = calls.clone();
        let hook: DeviceDrawFn<Flex> = Arc::new(move |logits, draws| {
            counted.fetch_add(draws.len(), Ordering::Relaxed);
            draw_on_host(logits, draws)
        });
        let with = |draw: Option<&DeviceDrawFn<Flex>>| DeviceSampling {
            argmax: None,
            draw: draw.cloned(),
            logprobs: None,
            edit: None,
        };
        let out = StepOutput::read(tensor(&rows), &plan, &[], &with(Some(&hook))).unwrap();
        assert_eq!(calls.load(Ordering::Relaxed), 2, "one draw per temperature row");
        let want = vec![
            None,
            Some(sampling::device_draw(&rows[1], 0.9, DrawCuts::NONE, 7)),
            Some(sampling::argmax(&rows[2])),
            Some(sampling::device_draw(&rows[3], 0.9, cuts, 8)),
            None,
        ];
        assert_eq!(out.device, want);
        assert_eq!(out.host_rows, [&rows[0][..], &rows[4]].concat());
        // Without the hook, or when it fails, the temperature rows go to the host.
        let failing: DeviceDrawFn<Flex> = Arc::new(|_, _| Err("no kernel".into()));
        for hook in [None, Some(&failing)] {
            let out = StepOutput::read(tensor(&rows), &plan, &[], &with(hook)).unwrap();
            assert_eq!(
                out.device,
                vec![None, None, Some(sampling::argmax(&rows[2])), None, None]
            );
            assert_eq!(
                out.host_rows,
                [&rows[0][..], &rows[1], &rows[3], &rows[4]].concat()
            );
        }
        // Only draws: no argmax, the ids are the draws'.
        let only = [draw(1), draw(2)];
        let out = StepOutput::read(tensor(&rows[..2]), &only, &[], &with(Some(&hook))).unwrap();
        assert_eq!(
            out.device,
            vec![
                Some(sampling::device_draw(&rows[0], 0.9, DrawCuts::NONE, 1)),
                Some(sampling::device_draw(&rows[1], 0.9, DrawCuts::NONE, 2))
            ]
        );
    }

    #[test]
    fn sampling_step_output_takes_greedy_ids_from_the_argmax_hook() {
        use std::sync::Arc;
        let rows: Vec<Vec<f32>> = (0..4)
            .map(|r| (0..200).map(|i| ((i * 7 + r * 31) % 97) as f32 * 0.1).collect())
            .collect();
        let plan = [
            RowSampling::GREEDY,
            RowSampling::Host,
            RowSampling::GREEDY,
            RowSampling::GREEDY,
        ];
        // A hook whose ids differ from burn's shows that they are the ones used: the argmax of
        // every row plus one.
        let shifted: DeviceArgmaxFn<Flex> = Arc::new(|logits: Tensor<Flex, 2>| {
            let [rows, vocab] = logits.dims();
            let device = logits.device();
            let values = logits.into_data().to_vec::<f32>().map_err(|e| format!("{e:?}"))?;
            let ids: Vec<i32> = values
                .chunks(vocab)
                .map(|row| (sampling::argmax(row) as i32 + 1) % vocab as i32)
                .collect();
            Ok(Tensor::from_data(TensorData::new(ids, [rows]), &device))
        });
        let hooks = DeviceSampling {
            argmax: Some(shifted),
            draw: None,
            logprobs: None,
            edit: None,
        };
        let out = StepOutput::read(tensor(&rows), &plan, &[], &hooks).unwrap();
        let plus_one = |r: usize| Some((sampling::argmax(&rows[r]) + 1) % 200);
        assert_eq!(out.device, vec![plus_one(0), None, plus_one(2), plus_one(3)]);
        assert_eq!(out.host_rows, rows[1]);
        // A failing hook leaves the argmax to burn.
        let failing = DeviceSampling {
            argmax: Some(Arc::new(|_: Tensor<Flex, 2>| Err("no kernel".to_string())) as DeviceArgmaxFn<Flex>),
            draw: None,
            logprobs: None,
            edit: None,
        };
        let out = StepOutput::read(tensor(&rows), &plan, &[], &failing).unwrap();
        let argmax = |r: usize| Some(sampling::argmax(&rows[r]));
        assert_eq!(out.device, vec![argmax(0), None, argmax(2), argmax(3)]);
    }

    #[test]
    fn sampling_step_output_brings_back_logprobs_instead_of_rows() {
        use crate::model::draw::{draw_on_host, logprobs_on_host, DeviceDrawFn, DeviceLogprobsFn};
        use crate::sampling::DrawCuts;
        use std::sync::Arc;
        let rows: Vec<Vec<f32>> = (0..4)
            .map(|r| (0..300).map(|i| ((i * 11 + r * 37) % 89) as f32 * 0.07).collect())
            .collect();
        // Greedy with 3 alternatives, a draw with none, a plain greedy row, a host row.
        let drawn = RowSampling::DeviceDraw {
            temperature: 0.7,
            cuts: DrawCuts::NONE,
            key: 3,
            logprobs: Some(0),
        };
        let plan = [
            RowSampling::DeviceArgmax { logprobs: Some(3) },
            drawn,
            RowSampling::GREEDY,
            RowSampling::Host,
        ];
        let draw: DeviceDrawFn<Flex> = Arc::new(draw_on_host);
        let logprobs: DeviceLogprobsFn<Flex> = Arc::new(logprobs_on_host);
        let hooks = |logprobs: Option<DeviceLogprobsFn<Flex>>| DeviceSampling {
            argmax: None,
            draw: Some(draw.clone()),
            logprobs,
            edit: None,
        };
        let out = StepOutput::read(tensor(&rows), &plan, &[], &hooks(Some(logprobs))).unwrap();
        let greedy = sampling::argmax(&rows[0]);
        let token = sampling::device_draw(&rows[1], 0.7, DrawCuts::NONE, 3);
        assert_eq!(
            out.device,
            vec![Some(greedy), Some(token), Some(sampling::argmax(&rows[2])), None]
        );
        assert_eq!(
            out.logprobs,
            vec![
                Some(sampling::raw_logprobs(&rows[0], greedy, 3)),
                Some(sampling::raw_logprobs(&rows[1], token, 0)),
                None,
                None
            ]
        );
        assert_eq!(out.host_rows, rows[3], "only the host row comes back whole");
        // Without a logprobs hook, or when it fails, the rows that ask for logprobs go to the host.
        let failing: DeviceLogprobsFn<Flex> = Arc::new(|_, _, _, _| Err("no kernel".into()));
        for hook in [None, Some(failing)] {
            let out = StepOutput::read(tensor(&rows), &plan, &[], &hooks(hook)).unwrap();
            assert_eq!(
                out.device,
                vec![None, None, Some(sampling::argmax(&rows[2])), None]
            );
            assert_eq!(out.logprobs, vec![None; 4]);
            assert_eq!(out.host_rows, [&rows[0][..], &rows[1], &rows[3]].concat());
        }
    }

    #[test]
    fn sampling_step_output_chooses_edited_rows_from_edited_copies() {
        use crate::model::draw::{draw_on_host, edit_on_host, DeviceDrawFn, DeviceEditFn};
        use crate::sampling::{DrawCuts, LogitEdit};
        use std::sync::Arc;
        let rows: Vec<Vec<f32>> = (0..4)
            .map(|r| (0..300).map(|i| ((i * 17 + r * 23) % 83) as f32 * 0.09).collect())
            .collect();
        // Row 0: greedy, its argmax banned; row 1: a draw with a bias far up on one id; row 2:
        // plain greedy; row 3: greedy with a penalty that changes nothing of its argmax.
        let best0 = sampling::argmax(&rows[0]);
        let edits = vec![
            vec![LogitEdit::Ban { id: best0 }],
            vec![LogitEdit::Add { id: 77, value: 100.0 }],
            Vec::new(),
            vec![LogitEdit::Repeat { id: 1, penalty: 1.5 }],
        ];
        let drawn = RowSampling::DeviceDraw {
            temperature: 0.8,
            cuts: DrawCuts::NONE,
            key: 4,
            logprobs: None,
        };
        let plan = [
            RowSampling::GREEDY,
            drawn,
            RowSampling::GREEDY,
            RowSampling::GREEDY,
        ];
        let edit: DeviceEditFn<Flex> = Arc::new(edit_on_host);
        let draw: DeviceDrawFn<Flex> = Arc::new(draw_on_host);
        let hooks = |edit: Option<DeviceEditFn<Flex>>| DeviceSampling {
            argmax: None,
            draw: Some(draw.clone()),
            logprobs: None,
            edit,
        };
        let out = StepOutput::read(tensor(&rows), &plan, &edits, &hooks(Some(edit))).unwrap();
        let processed: Vec<Vec<f32>> = rows
            .iter()
            .zip(&edits)
            .map(|(r, e)| {
                let mut w = r.clone();
                sampling::apply_edits(&mut w, e, None);
                w
            })
            .collect();
        assert_eq!(
            out.device,
            vec![
                Some(sampling::argmax(&processed[0])),
                Some(sampling::device_draw(&processed[1], 0.8, DrawCuts::NONE, 4)),
                Some(sampling::argmax(&rows[2])),
                Some(sampling::argmax(&processed[3])),
            ]
        );
        assert_ne!(out.device[0], Some(best0), "the ban moved the argmax");
        assert_eq!(out.device[1], Some(77), "the bias won the draw");
        assert!(out.host_rows.is_empty());
        // Without an edit hook, or when it fails, the edited rows go to the host.
        let failing: DeviceEditFn<Flex> = Arc::new(|_, _, _| Err("no kernel".into()));
        for hook in [None, Some(failing)] {
            let out = StepOutput::read(tensor(&rows), &plan, &edits, &hooks(hook)).unwrap();
            assert_eq!(
                out.device,
                vec![None, None, Some(sampling::argmax(&rows[2])), None]
            );
            assert_eq!(out.host_rows, [&rows[0][..], &rows[1], &rows[3]].concat());
        }
    }

    /// Penalised rows whose last token the device fed back (overlapped steps) are edited with
    /// that token, read from the previous step's ids where `FedEdits` points.
    #[test]
    fn sampling_step_output_edits_fed_rows_with_the_fed_token() {
        use crate::model::draw::{edit_on_host, DeviceEditFn};
        use crate::sampling::{logit_edits, logit_edits_fed, SamplingParams, TokenHistory};
        use std::sync::Arc;
        // Each row's argmax is its fed token, which a repetition penalty of 50 pushes below
        // the rest: only a row edited with its fed token moves off it.
        let vocab = 40;
        let fed_tokens = [7u32, 21, 3];
        let rows: Vec<Vec<f32>> = fed_tokens
            .iter()
            .enumerate()
            .map(|(r, &t)| {
                (0..vocab)
                    .map(|i| {
                        if i == t as usize {
                            5.0
                        } else {
                            ((i * 7 + r * 3) % 11) as f32 * 0.1
                        }
                    })
                    .collect()
            })
            .collect();
        let params = SamplingParams {
            temperature: 0.0,
            repetition_penalty: 50.0,
            frequency_penalty: 0.5,
            ..Default::default()
        };
        let history = TokenHistory {
            tokens: Arc::from([1u32, 2, 21]),
            prompt_len: 1,
        };
        let edits: Vec<_> = (0..3).map(|_| logit_edits_fed(&params, 3, &history)).collect();
        // The previous step's ids hold the fed tokens out of order, after another row's id.
        let ids = Tensor::<Flex, 1, Int>::from_data(
            TensorData::new(vec![9i64, 3, 21, 7], [4]),
            &Default::default(),
        );
        let at = [Some(3), Some(2), Some(1)];
        let edit: DeviceEditFn<Flex> = Arc::new(edit_on_host);
        let hooks = DeviceSampling {
            edit: Some(edit),
            ..DeviceSampling::default()
        };
        let plan = [RowSampling::GREEDY; 3];
        let fed = FedEdits { ids: &ids, at: &at };
        let out = UnreadOutput::issue(tensor(&rows), &plan, &edits, Some(fed), &hooks)
            .unwrap()
            .read()
            .unwrap();
        for (r, &t) in fed_tokens.iter().enumerate() {
            let whole = TokenHistory {
                tokens: history.tokens.iter().copied().chain([t]).collect(),
                prompt_len: 1,
            };
            let mut want = rows[r].clone();
            sampling::apply_edits(&mut want, &logit_edits(&params, 3, Some(&whole)), None);
            assert_eq!(out.device[r], Some(sampling::argmax(&want)), "row {r}");
            assert_ne!(out.device[r], Some(t), "row {r}: the fed token was penalised");
        }
    }

    /// Logits in the model's type (here f16) as `forward_fed` leaves them: the argmax hook reads
    /// them as they are, and the draw, the edits, the logprobs and the host read f32 copies of
    /// the same values, so every row's choice is what it would be from f32 logits.
    #[test]
    fn sampling_step_output_reads_half_precision_logits() {
        use crate::model::draw::{draw_on_host, edit_on_host, logprobs_on_host};
        use crate::model::draw::{DeviceEditFn, DeviceLogprobsFn};
        use crate::sampling::{DrawCuts, LogitEdit};
        use std::sync::{Arc, Mutex};
        // Eighths within ±8: exact in f16, so the f32 references below see the same values.
        let rows: Vec<Vec<f32>> = (0..4)
            .map(|r| {
                (0..300)
                    .map(|i| ((i * 37 + r * 11) % 129) as f32 / 8.0 - 8.0)
                    .collect()
            })
            .collect();
        let half = Tensor::<Flex, 2>::from_data(
            TensorData::new(rows.concat(), [rows.len(), 300]),
            (&Default::default(), DType::F16),
        );
        assert_eq!(half.dtype(), DType::F16);
        // Each hook records the type it was given, then runs as the host's reference.
        let seen = Arc::new(Mutex::new(Vec::new()));
        let saw = |what: &'static str| {
            let seen = seen.clone();
            move |t: &Tensor<Flex, 2>| seen.lock().unwrap().push((what, t.dtype()))
        };
        let on_argmax = saw("argmax");
        let argmax: DeviceArgmaxFn<Flex> = Arc::new(move |t| {
            on_argmax(&t);
            Ok(t.argmax(1).flatten(0, 1))
        });
        let on_draw = saw("draw");
        let draw: DeviceDrawFn<Flex> = Arc::new(move |t, d| {
            on_draw(&t);
            draw_on_host(t, d)
        });
        let on_logprobs = saw("logprobs");
        let logprobs: DeviceLogprobsFn<Flex> = Arc::new(move |t, ids, r, top| {
            on_logprobs(&t);
            logprobs_on_host(t, ids, r, top)
        });
        let on_edit = saw("edit");
        let edit: DeviceEditFn<Flex> = Arc::new(move |t, r, fed| {
            on_edit(&t);
            edit_on_host(t, r, fed)
        });
        let hooks = DeviceSampling {
            argmax: Some(argmax),
            draw: Some(draw),
            logprobs: Some(logprobs),
            edit: Some(edit),
        };
        // Greedy only: the argmax reads f16, and nothing else runs.
        let out = StepOutput::read(half.clone(), &[RowSampling::GREEDY; 4], &[], &hooks).unwrap();
        let want: Vec<Option<u32>> = rows.iter().map(|r| Some(sampling::argmax(r))).collect();
        assert_eq!(out.device, want);
        assert_eq!(*seen.lock().unwrap(), [("argmax", DType::F16)]);
        seen.lock().unwrap().clear();
        // Row 0 greedy with logprobs, row 1 a draw, row 2 greedy with its argmax banned, row 3
        // the host's.
        let best2 = sampling::argmax(&rows[2]);
        let edits = vec![
            Vec::new(),
            Vec::new(),
            vec![LogitEdit::Ban { id: best2 }],
            Vec::new(),
        ];
        let plan = [
            RowSampling::DeviceArgmax { logprobs: Some(2) },
            RowSampling::DeviceDraw {
                temperature: 0.9,
                cuts: DrawCuts::NONE,
                key: 5,
                logprobs: None,
            },
            RowSampling::GREEDY,
            RowSampling::Host,
        ];
        let out = StepOutput::read(half, &plan, &edits, &hooks).unwrap();
        let best0 = sampling::argmax(&rows[0]);
        let mut banned = rows[2].clone();
        banned[best2 as usize] = f32::NEG_INFINITY;
        assert_eq!(
            out.device,
            vec![
                Some(best0),
                Some(sampling::device_draw(&rows[1], 0.9, DrawCuts::NONE, 5)),
                Some(sampling::argmax(&banned)),
                None
            ]
        );
        assert_eq!(out.logprobs[0], Some(sampling::raw_logprobs(&rows[0], best0, 2)));
        assert_eq!(out.host_rows, rows[3], "the host row, in f32");
        let mut seen = seen.lock().unwrap().clone();
        seen.sort_by_key(|&(what, dtype)| (what, format!("{dtype:?}")));
        let want = [
            ("argmax", DType::F16),
            ("argmax", DType::F32),
            ("draw", DType::F32),
            ("edit", DType::F32),
            ("logprobs", DType::F32),
        ];
        assert_eq!(seen, want, "the raw logits' argmax, then the edited copy's");
    }
}
