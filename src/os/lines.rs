//! Reading lines from pipes other programs write (nginx's stderr, a hook's output): each line
//! is bounded and a longer one comes in pieces, so a writer that never ends its line cannot
//! grow our memory.

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt};

/// The most one line (or piece of a line) holds, newline included.
pub const MAX_LINE: usize = 16 * 1024;

/// Reads the next line of `reader` into `line` (cleared first): up to and with its newline, or
/// its next `MAX_LINE` bytes. `false` at the end of the input or on an error.
pub async fn next_line<R: AsyncBufRead + Unpin>(reader: &mut R, line: &mut Vec<u8>) -> bool {
    line.clear();
    matches!(reader.take(MAX_LINE as u64).read_until(b'\n', line).await, Ok(n) if n > 0)
}
