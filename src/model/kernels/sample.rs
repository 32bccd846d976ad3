//! A temperature draw of a logits row where the logits are: one cube per drawn row walks its
//! vocabulary once and keeps the token with the largest `l / temperature - ln(-ln u)` (the
//! Gumbel-max trick, `sampling::device_draw`, whose hash of `(key, id)` it computes bit for bit).
//!
//! Why: a temperature request otherwise brings its whole row back to the host, 0.5 MB per row
//! with a 128,256-token vocabulary (65 MB per step at 128 sequences), and the host walks it.
//! Here only the token id comes back, as for greedy rows. Greedy rows' argmax runs the same
//! walk and reduction without the noise ([`launch_argmax`]).

use cubecl::prelude::*;

use super::Refused;

/// Units per drawn row (a power of two, for the tree reduction).
const UNITS: usize = 256;

#[cube(launch_unchecked)]
fn draw_kernel(
    logits: &Array<f32>,
    rows: &Array<u32>,
    temperatures: &Array<f32>,
    keys: &Array<u32>,
    ids: &mut Array<i32>,
    vocab: u32,
) {
    let (d, u) = (CUBE_POS_X as usize, UNIT_POS_X as usize);
    let vocab = vocab as usize;
    let base = rows[d] as usize * vocab;
    let temperature = temperatures[d];
    let (lo, hi) = (keys[2 * d], keys[2 * d + 1]);
    // f32::MIN stands for minus infinity (WGSL cannot spell it); a -inf logit never wins.
    let mut best_score = f32::new(-3.402_823_5e38);
    let mut best_id = 0u32;
    let mut i = u;
    while i < vocab {
        let mut x = (i as u32 ^ lo) * 0x9E37_79B1u32;
        x ^= x >> 16u32;
        x *= 0x85EB_CA6Bu32;
        x ^= x >> 13u32;
        x ^= hi;
        x *= 0xC2B2_AE35u32;
        x ^= x >> 16u32;
        let uniform = (f32::cast_from(x >> 8u32) + 0.5) / 16_777_216.0;
        let score = logits[base + i] / temperature - (-uniform.ln()).ln();
        // Ids grow along a unit's walk: a strict `>` keeps the lowest id of a tie (and skips NaN).
        if score > best_score {
            best_score = score;
            best_id = i as u32;
        }
        i += UNITS;
    }
    let best = cube_best(best_score, best_id);
    if u == 0 {
        ids[d] = best as i32;
    }
}

/// The cube's best of its units' `(score, id)`: the largest score, the lowest id of a tie, by a
/// tree reduction in shared memory. Every unit gets the winner's id.
#[cube]
fn cube_best(score: f32, id: u32) -> u32 {
    let u = UNIT_POS_X as usize;
    let mut scores = SharedMemory::<f32>::new(UNITS);
    let mut best = SharedMemory::<u32>::new(UNITS);
    scores[u] = score;
    best[u] = id;
    sync_cube();
    // `CUBE_DIM_X`, not the constant: a loop variable must be a runtime value.
    let mut stride = CUBE_DIM_X as usize / 2;
    while stride > 0 {
        if u < stride {
            let (s, i) = (scores[u + stride], best[u + stride]);
            if s > scores[u] || (s == scores[u] && i < best[u]) {
                scores[u] = s;
                best[u] = i;
            }
        }
        sync_cube();
        stride /= 2;
    }
    best[0]
}

/// The argmax of each logits row, one cube per row: what greedy rows need, with the same
/// tie-break as the host's sampler (the lowest id).
#[cube(launch_unchecked)]
fn argmax_kernel(logits: &Array<f32>, ids: &mut Array<i32>, vocab: u32) {
    let (r, u) = (CUBE_POS_X as usize, UNIT_POS_X as usize);
    let vocab = vocab as usize;
    let base = r * vocab;
    let mut best_score = f32::new(-3.402_823_5e38);
    let mut best_id = 0u32;
    let mut i = u;
    while i < vocab {
        // Coalesced: the cube's units read 256 neighbouring logits per pass.
        let score = logits[base + i];
        if score > best_score {
            best_score = score;
            best_id = i as u32;
        }
        i += UNITS;
    }
    let best = cube_best(best_score, best_id);
    if u == 0 {
        ids[r] = best as i32;
    }
}

/// Queues the argmax of each of `rows` contiguous f32 rows of `vocab` in `logits`, into `ids`
/// (i32, one per row).
///
/// Why: burn 0.21's `argmax`, without autotune, reduces each row with a single unit (cubek's
/// `Unit` routine): one thread walks 128,256 logits, a serial pass of milliseconds per step.
pub fn launch_argmax<R: Runtime>(
    client: &ComputeClient<R>,
    [logits, ids]: [cubecl::server::Handle; 2],
    (rows, vocab): (usize, usize),
) -> Result<(), Refused> {
    if rows == 0 {
        return Ok(());
    }
    let cubes = cube_per_row(rows, rows, vocab)
        .ok_or_else(|| Refused(format!("the argmax of {rows} rows of {vocab}")))?;
    // SAFETY: `logits` holds `rows * vocab` f32 and `ids` `rows` i32 (the caller's contract);
    // cube `r` reads row `r` below `vocab` and writes `ids[r]`.
    unsafe {
        argmax_kernel::launch_unchecked::<R>(
            client,
            CubeCount::Static(cubes, 1, 1),
            CubeDim::new_1d(UNITS as u32),
            ArrayArg::from_raw_parts(logits, rows * vocab),
            ArrayArg::from_raw_parts(ids, rows),
            vocab as u32,
        );
    }
    Ok(())
}

/// The cube count of a launch with one cube per row, each reading a row of `vocab` logits out of
/// `logits_rows`; `None` when the vocabulary is empty or the indices would not fit 32 bits.
fn cube_per_row(rows: usize, logits_rows: usize, vocab: usize) -> Option<u32> {
    let cubes = u32::try_from(rows).ok()?;
    let fits = vocab > 0 && i32::try_from(vocab).is_ok() && u32::try_from(logits_rows * vocab).is_ok();
    (fits && cubes <= super::MAX_CUBES_PER_DIM).then_some(cubes)
}

/// Queues the draws: `logits` holds contiguous f32 rows of `vocab`; draw `d` takes row `rows[d]`
/// (u32) with `temperatures[d]` (f32, above 0) and the key halves `keys[2d]` (low) and
/// `keys[2d + 1]` (high), and writes its token id to `ids[d]` (i32).
pub fn launch<R: Runtime>(
    client: &ComputeClient<R>,
    [logits, rows, temperatures, keys, ids]: [cubecl::server::Handle; 5],
    (draws, logits_rows, vocab): (usize, usize, usize),
) -> Result<(), Refused> {
    if draws == 0 {
        return Ok(());
    }
    let cubes = cube_per_row(draws, logits_rows, vocab)
        .ok_or_else(|| Refused(format!("{draws} draws from {logits_rows} rows of {vocab}")))?;
    // SAFETY: the arrays' lengths are the handles' (the caller's contract: every `rows[d]` is
    // below `logits_rows`); the kernel reads row `rows[d]` below `vocab` and writes `ids[d]`.
    unsafe {
        draw_kernel::launch_unchecked::<R>(
            client,
            CubeCount::Static(cubes, 1, 1),
            CubeDim::new_1d(UNITS as u32),
            ArrayArg::from_raw_parts(logits, logits_rows * vocab),
            ArrayArg::from_raw_parts(rows, draws),
            ArrayArg::from_raw_parts(temperatures, draws),
            ArrayArg::from_raw_parts(keys, 2 * draws),
            ArrayArg::from_raw_parts(ids, draws),
            vocab as u32,
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::kernels::gl;
    use crate::sampling::device_draw;

    #[test]
    fn kernels_sample_draws_the_token_of_the_host_reference() {
        let client = gl::client();
        // A vocabulary that is not a multiple of the cube, a -inf logit, rows drawn twice with
        // other keys and temperatures.
        let (logits_rows, vocab) = (3, 1000);
        let mut logits: Vec<f32> = gl::values(logits_rows * vocab, 5)
            .iter()
            .map(|v| v * 4.0)
            .collect();
        logits[vocab + 17] = f32::NEG_INFINITY;
        let draws: Vec<(u32, f32, u64)> = (0..24u64)
            .map(|d| {
                (
                    (d % 3) as u32,
                    [0.5f32, 1.0, 1.7][(d / 3 % 3) as usize],
                    d * 0x1234_5678_9ABC + 11,
                )
            })
            .collect();
        let rows: Vec<u32> = draws.iter().map(|d| d.0).collect();
        let temps: Vec<f32> = draws.iter().map(|d| d.1).collect();
        let keys: Vec<u32> = draws
            .iter()
            .flat_map(|d| [d.2 as u32, (d.2 >> 32) as u32])
            .collect();
        let ids = client.empty(draws.len() * 4);
        let handles = [
            gl::upload(&client, &logits),
            client.create_from_slice(u32::as_bytes(&rows)),
            gl::upload(&client, &temps),
            client.create_from_slice(u32::as_bytes(&keys)),
            ids.clone(),
        ];
        launch(&client, handles, (draws.len(), logits_rows, vocab)).unwrap();
        let got = client.read_one(ids).expect("read back the ids");
        let got = i32::from_bytes(&got).to_vec();
        let want: Vec<i32> = draws
            .iter()
            .map(|&(row, t, key)| {
                let row = &logits[row as usize * vocab..(row as usize + 1) * vocab];
                device_draw(row, t, key) as i32
            })
            .collect();
        assert_eq!(got, want);
        // Different keys really draw different tokens.
        let distinct: std::collections::HashSet<i32> = got.iter().copied().collect();
        assert!(distinct.len() > 3, "{got:?}");
    }

    #[test]
    fn kernels_sample_argmax_is_the_host_argmax() {
        let client = gl::client();
        // A vocabulary that is not a multiple of the cube; ties (the lowest id wins), a -inf
        // logit, a row whose maximum is its last logit, and a row of equal logits.
        let (rows, vocab) = (5, 1003);
        let mut logits: Vec<f32> = gl::values(rows * vocab, 9).iter().map(|v| v * 4.0).collect();
        logits[17] = 9.0;
        logits[700] = 9.0;
        logits[vocab + 3] = f32::NEG_INFINITY;
        logits[3 * vocab - 1] = 50.0;
        logits[3 * vocab..4 * vocab].fill(0.25);
        let ids = client.empty(rows * 4);
        let handles = [gl::upload(&client, &logits), ids.clone()];
        launch_argmax(&client, handles, (rows, vocab)).unwrap();
        let got = i32::from_bytes(&client.read_one(ids).expect("read back the ids")).to_vec();
        let want: Vec<i32> = logits
            .chunks(vocab)
            .map(|row| crate::sampling::argmax(row) as i32)
            .collect();
        assert_eq!(got, want);
        assert_eq!((got[0], got[2], got[3]), (17, vocab as i32 - 1, 0));
    }

    #[test]
    fn kernels_sample_refuses_an_empty_vocabulary() {
        let client = gl::client();
        let handles = std::array::from_fn(|_| gl::upload(&client, &[0.0; 4]));
        assert!(launch(&client, handles, (1, 1, 0)).is_err());
        let handles = std::array::from_fn(|_| gl::upload(&client, &[0.0; 4]));
        assert!(launch_argmax(&client, handles, (1, 0)).is_err());
    }
}
