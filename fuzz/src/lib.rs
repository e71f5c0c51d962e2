//! Shared pieces of the fuzz targets: a reader that turns the fuzzer's bytes into
//! operations.

/// Reads operations and their arguments off the fuzzer's input; past the end, every read
/// gives zeros / empty slices, so any input is a valid program.
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    /// The reader over `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Self { data }
    }

    /// Whether the input is used up.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// One byte.
    pub fn byte(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&b, rest)) => {
                self.data = rest;
                b
            }
            None => 0,
        }
    }

    /// A little-endian u16.
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.byte(), self.byte()])
    }

    /// A slice of length given by the next u16 (cut at the end of the input).
    pub fn chunk(&mut self) -> &'a [u8] {
        let len = usize::from(self.u16()).min(self.data.len());
        let (chunk, rest) = self.data.split_at(len);
        self.data = rest;
        chunk
    }
}
