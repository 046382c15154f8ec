//! The Confluent wire format: magic byte 0, a 4-byte big-endian schema id,
//! then the Avro binary body.

/// First byte of every framed message.
pub const MAGIC_BYTE: u8 = 0;
/// Magic byte plus schema id.
pub const HEADER_LEN: usize = 5;

/// A message that is not in the Confluent wire format.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FramingError {
    #[error("message is {0} bytes, shorter than the 5-byte wire-format header")]
    TooShort(usize),
    #[error("wrong magic byte {0:#04x} (expected 0x00)")]
    WrongMagic(u8),
}

/// Splits a framed message into its schema id and Avro body.
pub fn split(bytes: &[u8]) -> Result<(u32, &[u8]), FramingError> {
    if bytes.len() < HEADER_LEN {
        return Err(FramingError::TooShort(bytes.len()));
    }
    if bytes[0] != MAGIC_BYTE {
        return Err(FramingError::WrongMagic(bytes[0]));
    }
    let id = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]);
    Ok((id, &bytes[HEADER_LEN..]))
}

/// Frames an Avro body with its schema id.
pub fn frame(schema_id: u32, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.push(MAGIC_BYTE);
    out.extend_from_slice(&schema_id.to_be_bytes());
    out.extend_from_slice(body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_then_split_gives_back_id_and_body() {
        let framed = frame(0x0102_0304, b"body");
        assert_eq!(&framed[..5], &[0, 1, 2, 3, 4]);
        assert_eq!(split(&framed), Ok((0x0102_0304, &b"body"[..])));
    }
}
