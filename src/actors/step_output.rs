//! What a step brings back from the device: a token id for every plain-greedy row (its argmax,
//! taken on the device), the full f32 logits only of the rows the host must sample.
//!
//! Why: at 128 sequences and a 128,256-token vocabulary the whole logits matrix is 65 MB per
//! step, and a host argmax over 16M floats; greedy rows without bias, penalties, an active
//! `min_tokens` mask or logprobs need none of it (`sampling::needs_host_logits`). Temperature,
//! top-k/top-p/min-p, penalties, bias and logprobs stay on the host for now.

use burn::prelude::Backend;
use burn::tensor::{Int, Tensor, TensorData};

/// A step's logits as the host receives them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepOutput {
    /// Values per logits row (the vocabulary size).
    pub vocab: usize,
    /// Per logits row, in row order: the device's argmax for a plain-greedy row, `None` for a row
    /// whose logits are in `host_rows`.
    pub greedy: Vec<Option<u32>>,
    /// The f32 logits of the `None` rows of `greedy`, in row order, `vocab` values each.
    pub host_rows: Vec<f32>,
}

impl StepOutput {
    /// Splits `logits` (`[rows, vocab]`, f32) by `host_rows` (one flag per row, true when the
    /// host samples the row). Reads back only what is needed: no device argmax when every row
    /// is a host row, no row copy when none is. The device's argmax keeps the lowest index of
    /// equal maxima, as `sampling::argmax` does on Flex (tested) and as cubek-reduce's `ArgMax`
    /// documents on CUDA; its reduction order, a NaN or an all `-inf` row may still pick another
    /// index there than the host would. An id outside the vocabulary fails the step.
    pub fn read<B: Backend>(logits: Tensor<B, 2>, host_rows: &[bool]) -> Result<Self, String> {
        let [rows, vocab] = logits.dims();
        if host_rows.len() != rows {
            return Err(format!(
                "step has {rows} logits rows but {} sampling flags",
                host_rows.len()
            ));
        }
        let on_host: Vec<i32> = (0..rows as i32).filter(|&r| host_rows[r as usize]).collect();
        let device = logits.device();
        // Both reads are issued before either is awaited, so a device can run them together.
        let ids = (on_host.len() < rows).then(|| logits.clone().argmax(1));
        let host = match on_host.len() {
            0 => None,
            n if n == rows => Some(logits),
            n => {
                let idx = Tensor::<B, 1, Int>::from_data(TensorData::new(on_host, [n]), &device);
                Some(logits.select(0, idx))
            }
        };
        let greedy = match ids {
            None => vec![None; rows],
            Some(ids) => {
                let data = ids.into_data();
                let ids: Vec<i64> = data.iter::<i64>().collect();
                ids.into_iter()
                    .zip(host_rows)
                    .map(|(id, &host)| match host {
                        true => Ok(None),
                        false if (0..vocab as i64).contains(&id) => Ok(Some(id as u32)),
                        false => Err(format!("device argmax gave id {id} for a vocabulary of {vocab}")),
                    })
                    .collect::<Result<_, _>>()?
            }
        };
        let host_rows = match host {
            None => Vec::new(),
            Some(t) => t.into_data().to_vec::<f32>().map_err(|e| format!("{e:?}"))?,
        };
        Ok(Self {
            vocab,
            greedy,
            host_rows,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampling;
    use burn::backend::Flex;

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
            let out = StepOutput::read(tensor(&rows), &vec![false; rows.len()]).unwrap();
            for (i, (row, got)) in rows.iter().zip(&out.greedy).enumerate() {
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
        let out = StepOutput::read(tensor(&rows), &flags).unwrap();
        assert_eq!(out.vocab, 600);
        let want_ids: Vec<Option<u32>> = rows
            .iter()
            .zip(flags)
            .map(|(r, host)| (!host).then(|| sampling::argmax(r)))
            .collect();
        assert_eq!(out.greedy, want_ids);
        assert_eq!(out.host_rows, [&rows[1][..], &rows[3], &rows[4]].concat());

        let all = StepOutput::read(tensor(&rows), &[true; 5]).unwrap();
        assert_eq!(all.greedy, vec![None; 5]);
        assert_eq!(all.host_rows, rows.concat());

        let none = StepOutput::read(tensor(&rows), &[false; 5]).unwrap();
        assert!(none.host_rows.is_empty());
        assert!(none.greedy.iter().all(Option::is_some));

        assert!(StepOutput::read(tensor(&rows), &[false; 4]).is_err());
    }
}
