//! A bounds-checked walk over a GGUF file's header, run before candle parses it.
//!
//! candle's reader bounds string and array lengths by the file's size, but it divides by the `general.alignment`
//! entry without checking it (an alignment of 0 panics) and multiplies tensor dimensions without checking for
//! overflow when a tensor is read (found by the `gguf` fuzz target, `fuzz/regressions/gguf`). This walk reads the
//! same layout — magic and version, metadata entries, tensor infos — without allocating more than a name at a time,
//! and refuses, naming the entry or tensor: an alignment that is not a power of two, a tensor with a dimension of 0
//! (candle views its empty buffer through a misaligned pointer), a tensor whose element count or byte size overflows
//! or does not fill whole quantisation blocks, and a tensor whose data lies outside the file.
//! What passes is safe to hand to candle's reader, and every tensor it names can be read without a panic.

use candle_core::quantized::GgmlDType;

/// GGUF's value types, by their on-disk tag.
const U8: u32 = 0;
const I8: u32 = 1;
const U16: u32 = 2;
const I16: u32 = 3;
const U32: u32 = 4;
const I32: u32 = 5;
const F32: u32 = 6;
const BOOL: u32 = 7;
const STRING: u32 = 8;
const ARRAY: u32 = 9;
const U64: u32 = 10;
const I64: u32 = 11;
const F64: u32 = 12;

/// Deepest nesting of arrays accepted (GGUF files use one level; candle accepts 64).
const MAX_DEPTH: usize = 64;
/// Most dimensions of a tensor (ggml's `GGML_MAX_DIMS`).
const MAX_DIMS: u32 = 4;
/// The alignment of the tensor data when the file names none.
const DEFAULT_ALIGNMENT: u64 = 32;

/// A cursor over the header bytes; every read is bounds-checked.
struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
    /// Width of length prefixes: 4 bytes in version 1, 8 from version 2 on.
    wide: bool,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: u64, what: &str) -> Result<&'a [u8], String> {
        let remaining = (self.bytes.len() - self.at) as u64;
        if n > remaining {
            return Err(format!("{what}: needs {n} bytes, only {remaining} left in the file"));
        }
        let start = self.at;
        self.at += n as usize;
        Ok(&self.bytes[start..self.at])
    }

    fn u32(&mut self, what: &str) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.take(4, what)?.try_into().expect("4 bytes")))
    }

    fn u64(&mut self, what: &str) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.take(8, what)?.try_into().expect("8 bytes")))
    }

    fn length(&mut self, what: &str) -> Result<u64, String> {
        if self.wide { self.u64(what) } else { self.u32(what).map(u64::from) }
    }

    fn string(&mut self, what: &str) -> Result<&'a [u8], String> {
        let length = self.length(what)?;
        self.take(length, what)
    }

    /// Skips a value of type `tag`, returning it as an unsigned integer when it is one (for `general.alignment`).
    fn skip_value(&mut self, tag: u32, what: &str, depth: usize) -> Result<Option<u64>, String> {
        let size = match tag {
            U8 | I8 | BOOL => 1,
            U16 | I16 => 2,
            U32 | I32 | F32 => 4,
            U64 | I64 | F64 => 8,
            STRING => {
                self.string(what)?;
                return Ok(None);
            }
            ARRAY => {
                if depth >= MAX_DEPTH {
                    return Err(format!("{what}: arrays nested deeper than {MAX_DEPTH}"));
                }
                let element = self.u32(what)?;
                let count = self.length(what)?;
                for _ in 0..count {
                    self.skip_value(element, what, depth + 1)?;
                }
                return Ok(None);
            }
            other => return Err(format!("{what}: unknown value type {other}")),
        };
        let bytes = self.take(size, what)?;
        Ok(match tag {
            U8 => Some(u64::from(bytes[0])),
            U16 => Some(u64::from(u16::from_le_bytes([bytes[0], bytes[1]]))),
            U32 => Some(u64::from(u32::from_le_bytes(bytes.try_into().expect("4 bytes")))),
            U64 => Some(u64::from_le_bytes(bytes.try_into().expect("8 bytes"))),
            I8 | I16 | I32 | I64 => {
                let mut wide = [if bytes[bytes.len() - 1] & 0x80 != 0 { 0xFF } else { 0 }; 8];
                wide[..bytes.len()].copy_from_slice(bytes);
                u64::try_from(i64::from_le_bytes(wide)).ok()
            }
            _ => None,
        })
    }
}

/// ggml's tensor types by tag, as far as candle reads them.
fn ggml_dtype(tag: u32) -> Option<GgmlDType> {
    Some(match tag {
        0 => GgmlDType::F32,
        1 => GgmlDType::F16,
        2 => GgmlDType::Q4_0,
        3 => GgmlDType::Q4_1,
        6 => GgmlDType::Q5_0,
        7 => GgmlDType::Q5_1,
        8 => GgmlDType::Q8_0,
        9 => GgmlDType::Q8_1,
        10 => GgmlDType::Q2K,
        11 => GgmlDType::Q3K,
        12 => GgmlDType::Q4K,
        13 => GgmlDType::Q5K,
        14 => GgmlDType::Q6K,
        15 => GgmlDType::Q8K,
        30 => GgmlDType::BF16,
        _ => return None,
    })
}

/// One tensor's place in the file, as the header declares it.
struct TensorExtent {
    name: String,
    offset: u64,
    bytes: u64,
}

/// Walks the header of a GGUF file's bytes; an error says what is wrong, for the caller to name the file.
pub fn check(bytes: &[u8]) -> Result<(), String> {
    let mut cursor = Cursor { bytes, at: 0, wide: true };
    let magic = cursor.take(4, "magic")?;
    if magic != b"GGUF" {
        return Err(format!("magic: expected `GGUF`, found {magic:02x?}"));
    }
    let version = cursor.u32("version")?;
    if !(1..=3).contains(&version) {
        return Err(format!("version: expected 1, 2 or 3, found {version}"));
    }
    cursor.wide = version >= 2;
    let tensors = cursor.length("tensor count")?;
    let entries = cursor.length("metadata entry count")?;
    let mut alignment = DEFAULT_ALIGNMENT;
    for index in 0..entries {
        let key = String::from_utf8_lossy(cursor.string(&format!("metadata entry {index}: key"))?).into_owned();
        let what = format!("metadata `{key}`");
        let tag = cursor.u32(&what)?;
        let value = cursor.skip_value(tag, &what, 0)?;
        if key == "general.alignment" && matches!(tag, U8 | U16 | U32 | I8 | I16 | I32) {
            alignment = value.filter(|a| a.is_power_of_two()).ok_or_else(|| {
                format!("metadata `general.alignment`: expected a power of two, found {}", describe(value))
            })?;
        }
    }
    let mut extents = Vec::new();
    for index in 0..tensors {
        let name = String::from_utf8_lossy(cursor.string(&format!("tensor {index}: name"))?).into_owned();
        let what = format!("tensor `{name}`");
        let dims = cursor.u32(&what)?;
        if dims > MAX_DIMS {
            return Err(format!("{what}: {dims} dimensions, at most {MAX_DIMS} expected"));
        }
        let mut elements: u64 = 1;
        for _ in 0..dims {
            let size = cursor.length(&what)?;
            if size == 0 {
                // candle would view an empty buffer as blocks through a dangling, misaligned pointer.
                return Err(format!("{what}: a dimension of 0"));
            }
            elements = elements
                .checked_mul(size)
                .filter(|&e| usize::try_from(e).is_ok())
                .ok_or_else(|| format!("{what}: the element count overflows"))?;
        }
        let tag = cursor.u32(&what)?;
        let dtype = ggml_dtype(tag).ok_or_else(|| format!("{what}: unknown ggml type {tag}"))?;
        let block = dtype.block_size() as u64;
        if !elements.is_multiple_of(block) {
            return Err(format!("{what}: {elements} elements do not fill whole blocks of {block}"));
        }
        let bytes = (elements / block)
            .checked_mul(dtype.type_size() as u64)
            .ok_or_else(|| format!("{what}: the byte size overflows"))?;
        let offset = cursor.u64(&what)?;
        extents.push(TensorExtent { name, offset, bytes });
    }
    let data_start = (cursor.at as u64).div_ceil(alignment) * alignment;
    let file_size = bytes.len() as u64;
    for tensor in extents {
        let end = data_start.checked_add(tensor.offset).and_then(|start| start.checked_add(tensor.bytes));
        if end.is_none_or(|end| end > file_size) {
            return Err(format!(
                "tensor `{}`: {} bytes at data offset {} lie outside the file ({file_size} bytes, data from {data_start})",
                tensor.name, tensor.bytes, tensor.offset
            ));
        }
    }
    Ok(())
}

fn describe(value: Option<u64>) -> String {
    value.map_or_else(|| "a negative number".to_string(), |v| v.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A version-3 header with the given metadata entries (already encoded) and tensors `(name, dims, type, offset)`.
    fn header(entries: &[Vec<u8>], tensors: &[(&str, &[u64], u32, u64)]) -> Vec<u8> {
        let mut bytes = b"GGUF".to_vec();
        bytes.extend(3u32.to_le_bytes());
        bytes.extend((tensors.len() as u64).to_le_bytes());
        bytes.extend((entries.len() as u64).to_le_bytes());
        for entry in entries {
            bytes.extend(entry);
        }
        for (name, dims, tag, offset) in tensors {
            bytes.extend((name.len() as u64).to_le_bytes());
            bytes.extend(name.as_bytes());
            bytes.extend((dims.len() as u32).to_le_bytes());
            for d in *dims {
                bytes.extend(d.to_le_bytes());
            }
            bytes.extend(tag.to_le_bytes());
            bytes.extend(offset.to_le_bytes());
        }
        bytes
    }

    fn u32_entry(key: &str, value: u32) -> Vec<u8> {
        let mut bytes = (key.len() as u64).to_le_bytes().to_vec();
        bytes.extend(key.as_bytes());
        bytes.extend(U32.to_le_bytes());
        bytes.extend(value.to_le_bytes());
        bytes
    }

    fn with_data(mut bytes: Vec<u8>, alignment: usize, data: usize) -> Vec<u8> {
        bytes.resize(bytes.len().div_ceil(alignment) * alignment + data, 0);
        bytes
    }

    #[test]
    fn a_well_formed_header_passes_and_candle_reads_it() {
        let bytes = with_data(header(&[u32_entry("general.alignment", 64)], &[("w", &[4, 2], 0, 0)]), 64, 32);
        check(&bytes).unwrap();
        candle_core::quantized::gguf_file::Content::read(&mut std::io::Cursor::new(&bytes)).unwrap();
    }

    #[test]
    fn an_alignment_of_zero_is_refused_not_divided_by() {
        let bytes = with_data(header(&[u32_entry("general.alignment", 0)], &[]), 32, 0);
        let message = check(&bytes).unwrap_err();
        assert!(message.contains("general.alignment") && message.contains("power of two"), "{message}");
        let bytes = with_data(header(&[u32_entry("general.alignment", 24)], &[]), 32, 0);
        assert!(check(&bytes).unwrap_err().contains("found 24"));
    }

    #[test]
    fn overflowing_and_outlying_tensors_are_named() {
        let huge = u64::MAX / 2;
        let message = check(&with_data(header(&[], &[("big", &[huge, 4], 0, 0)]), 32, 0)).unwrap_err();
        assert!(message.contains("tensor `big`") && message.contains("overflows"), "{message}");
        let message = check(&with_data(header(&[], &[("w", &[4, 2], 0, 0)]), 32, 31)).unwrap_err();
        assert!(message.contains("tensor `w`") && message.contains("outside the file"), "{message}");
        let message = check(&with_data(header(&[], &[("empty", &[4, 0], 0, 0)]), 32, 64)).unwrap_err();
        assert!(message.contains("tensor `empty`") && message.contains("dimension of 0"), "{message}");
        let message = check(&with_data(header(&[], &[("q", &[31], 12, 0)]), 32, 4096)).unwrap_err();
        assert!(message.contains("whole blocks of 256"), "{message}");
    }

    #[test]
    fn truncated_headers_and_unknown_types_are_errors() {
        let bytes = header(&[u32_entry("a", 1)], &[("w", &[4], 0, 0)]);
        for cut in 0..bytes.len() {
            assert!(check(&bytes[..cut]).is_err(), "a header cut at {cut} bytes passed");
        }
        let mut entry = u32_entry("a", 1);
        entry[9..13].copy_from_slice(&99u32.to_le_bytes());
        assert!(check(&header(&[entry], &[])).unwrap_err().contains("unknown value type 99"));
    }
}
