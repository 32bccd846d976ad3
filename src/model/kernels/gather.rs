//! The embedding's rows of a step's token ids in one launch: `out[r] = table[ids[r]]`.
//!
//! Why: burn's `select` is one launch too, but the host pays nearly twice ours to issue it
//! (docs/Performance.md). It binds its operands as tensors, whose shapes and strides cubecl
//! sends as metadata of their own (on CUDA an upload per launch, on cubecl's runner), and its
//! generated launch copies the device's properties (see `queue_kernel!`). It runs once per step,
//! which at batch 1 is a step's largest single launch cost on the calling thread.

use cubecl::prelude::*;

use super::Refused;

const UNITS: u32 = 256;

/// Unit `i` copies vector `i % row_vectors` of row `ids[i / row_vectors]`; an id past the table
/// (which the server never sends) reads its last row rather than out of bounds.
#[cube(launch_unchecked)]
fn gather_rows_kernel<F: Float, N: Size>(
    table: &Array<Vector<F, N>>,
    ids: &Array<u32>,
    out: &mut Array<Vector<F, N>>,
    row_vectors: u32,
    table_rows: u32,
    #[define(F)] _dtype: StorageType,
) {
    if ABSOLUTE_POS < out.len() {
        let w = row_vectors as usize;
        // Started from the array's value, not a constant: a mutable that starts as a constant
        // breaks cubecl's expansion (docs/DeveloperGuide.md).
        let mut id = ids[ABSOLUTE_POS / w];
        if id >= table_rows {
            id = table_rows - 1;
        }
        out[ABSOLUTE_POS] = table[id as usize * w + ABSOLUTE_POS % w];
    }
}

/// Sizes of one gather: `table` is `[table_rows, width]`, `ids` `[rows]` (32-bit; i32 ids are
/// read as u32, so a negative one is past the table), `out` `[rows, width]`, all contiguous.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GatherShape {
    pub rows: usize,
    pub width: usize,
    pub table_rows: usize,
}

/// Queues `out = table[ids]` (rows), elements of `dtype` (`elem_bytes` each).
pub fn launch<R: Runtime>(
    client: &ComputeClient<R>,
    [table, ids, out]: [cubecl::server::Handle; 3],
    shape: GatherShape,
    (dtype, elem_bytes): (StorageType, usize),
) -> Result<(), Refused> {
    let GatherShape {
        rows,
        width,
        table_rows,
    } = shape;
    if rows == 0 || width == 0 {
        return Ok(());
    }
    if table_rows == 0 {
        return Err(Refused("an empty embedding table".into()));
    }
    let vector = super::vector_width(width, elem_bytes, client.properties().hardware.max_vector_size);
    let row_vectors = width / vector;
    let (Ok(row_vectors_u32), Ok(table_rows_u32), Ok(_)) = (
        u32::try_from(row_vectors),
        u32::try_from(table_rows),
        u32::try_from(table_rows * width),
    ) else {
        return Err(Refused(format!(
            "a table of {table_rows} rows of {width} does not fit 32-bit indices"
        )));
    };
    let cubes = super::elementwise_cubes(rows * row_vectors, UNITS)?;
    // SAFETY: the arrays' lengths are those of the handles' buffers (the caller's contract); the
    // kernel checks `ABSOLUTE_POS < rows * row_vectors`, so `ids` is read below `rows`, and reads
    // `table` at an id below `table_rows` (one past it is clamped).
    unsafe {
        queue_kernel!(
            gather_rows_kernel::GatherRowsKernel<R>(client, cubes, CubeDim::new_1d(UNITS)),
            define [F = dtype],
            size [N = vector],
            // Lengths in elements: cubecl divides them by the vector width for `len()`.
            args [
                Array<Vector<F, N>> = ArrayArg::from_raw_parts(table, table_rows * width),
                Array<u32> = ArrayArg::from_raw_parts(ids, rows),
                Array<Vector<F, N>> = ArrayArg::from_raw_parts(out, rows * width),
                u32 = row_vectors_u32,
                u32 = table_rows_u32,
            ],
            comptime [vector, dtype],
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::kernels::gl;

    #[test]
    fn kernels_gather_rows_copies_each_ids_row_and_the_last_past_the_table() {
        let client = gl::client();
        let f32_type = f32::as_type_native_unchecked().storage_type();
        // Widths of every vector width (4, 2, 1 floats) and a row count past one cube.
        for (table_rows, width, ids) in [
            (5usize, 8usize, vec![4u32, 0, 4, 2]),
            (7, 6, vec![6, 1, 1]),
            (3, 5, vec![2]),
            (300, 64, (0..300u32).rev().chain([0, 299, 7]).collect()),
        ] {
            let table = gl::values(table_rows * width, width);
            // One id past the table, and one that is a negative i32 read as u32.
            let ids: Vec<u32> = ids.into_iter().chain([table_rows as u32, u32::MAX]).collect();
            let rows = ids.len();
            let out = client.empty(rows * width * 4);
            let handles = [
                gl::upload(&client, &table),
                client.create_from_slice(u32::as_bytes(&ids)),
                out.clone(),
            ];
            let shape = GatherShape {
                rows,
                width,
                table_rows,
            };
            launch(&client, handles, shape, (f32_type, 4)).unwrap();
            let got = gl::download(&client, out);
            for (r, &id) in ids.iter().enumerate() {
                let at = (id as usize).min(table_rows - 1);
                let want = table[at * width..(at + 1) * width].to_vec();
                assert_eq!(
                    got[r * width..(r + 1) * width],
                    want[..],
                    "row {r} (id {id}) of {table_rows}x{width}"
                );
            }
        }
    }
}
