//! The hand-written binary encoding of stored records.
//!
//! Big-endian integers, `u32`-length-prefixed byte strings, one tag byte for
//! options. Reading is bounds-checked everywhere: any input yields a value or
//! a [`DecodeError`], never a panic.

use crate::envelope::SealedBlob;
use crate::time::Timestamp;

/// No single field of a stored record is larger than this.
const MAX_FIELD_LEN: usize = 1 << 20;

/// Why stored bytes are not a record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The bytes ended early.
    #[error("record is truncated")]
    Truncated,
    /// Bytes were left over after the last field.
    #[error("record has trailing bytes")]
    TrailingBytes,
    /// The record is of another kind than expected.
    #[error("record kind {found} where {expected} was expected")]
    WrongKind {
        /// The kind code expected.
        expected: u8,
        /// The kind code found.
        found: u8,
    },
    /// A format version this build does not know.
    #[error("record format version {0} is not supported")]
    UnsupportedVersion(u8),
    /// A field holds a value outside its domain.
    #[error("record field {0} is invalid")]
    Invalid(&'static str),
}

#[derive(Default)]
pub(crate) struct Writer(Vec<u8>);

impl Writer {
    pub(crate) fn new(kind: u8, version: u8) -> Self {
        Writer(vec![kind, version])
    }

    pub(crate) fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }

    pub(crate) fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }

    pub(crate) fn time(&mut self, t: Timestamp) -> &mut Self {
        self.u64(t.unix_millis())
    }

    pub(crate) fn opt_time(&mut self, t: Option<Timestamp>) -> &mut Self {
        match t {
            None => self.u8(0),
            Some(t) => self.u8(1).time(t),
        }
    }

    pub(crate) fn bytes(&mut self, v: &[u8]) -> &mut Self {
        // Records are built from bounded fields; the cap is enforced on read.
        self.0.extend_from_slice(&(v.len() as u32).to_be_bytes());
        self.0.extend_from_slice(v);
        self
    }

    pub(crate) fn opt_bytes(&mut self, v: Option<&[u8]>) -> &mut Self {
        match v {
            None => self.u8(0),
            Some(v) => self.u8(1).bytes(v),
        }
    }

    pub(crate) fn str(&mut self, v: &str) -> &mut Self {
        self.bytes(v.as_bytes())
    }

    pub(crate) fn blob(&mut self, b: &SealedBlob) -> &mut Self {
        self.bytes(b.as_bytes())
    }

    pub(crate) fn opt_blob(&mut self, b: Option<&SealedBlob>) -> &mut Self {
        self.opt_bytes(b.map(SealedBlob::as_bytes))
    }

    pub(crate) fn strings(&mut self, v: &[String]) -> &mut Self {
        self.u64(v.len() as u64);
        for s in v {
            self.str(s);
        }
        self
    }

    pub(crate) fn finish(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.0)
    }
}

pub(crate) struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    /// Starts reading a record, checking its kind and format version.
    pub(crate) fn open(bytes: &'a [u8], kind: u8, version: u8) -> Result<Self, DecodeError> {
        let mut r = Reader(bytes);
        let found = r.u8()?;
        if found != kind {
            return Err(DecodeError::WrongKind { expected: kind, found });
        }
        let v = r.u8()?;
        if v != version {
            return Err(DecodeError::UnsupportedVersion(v));
        }
        Ok(r)
    }

    /// Starts reading a record whose format may be any of `formats` (an
    /// older one still read after an upgrade); answers the format found.
    pub(crate) fn open_any(
        bytes: &'a [u8],
        kind: u8,
        formats: std::ops::RangeInclusive<u8>,
    ) -> Result<(Self, u8), DecodeError> {
        let mut r = Reader(bytes);
        let found = r.u8()?;
        if found != kind {
            return Err(DecodeError::WrongKind { expected: kind, found });
        }
        let v = r.u8()?;
        if !formats.contains(&v) {
            return Err(DecodeError::UnsupportedVersion(v));
        }
        Ok((r, v))
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.0.len() < n {
            return Err(DecodeError::Truncated);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    pub(crate) fn u64(&mut self) -> Result<u64, DecodeError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }

    pub(crate) fn time(&mut self) -> Result<Timestamp, DecodeError> {
        self.u64().map(Timestamp::from_unix_millis)
    }

    fn tag(&mut self, field: &'static str) -> Result<bool, DecodeError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(DecodeError::Invalid(field)),
        }
    }

    pub(crate) fn opt_time(&mut self, field: &'static str) -> Result<Option<Timestamp>, DecodeError> {
        if self.tag(field)? { self.time().map(Some) } else { Ok(None) }
    }

    pub(crate) fn bytes(&mut self) -> Result<&'a [u8], DecodeError> {
        let len = self.take(4)?;
        let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
        if len > MAX_FIELD_LEN {
            return Err(DecodeError::Invalid("length"));
        }
        self.take(len)
    }

    pub(crate) fn opt_bytes(&mut self, field: &'static str) -> Result<Option<&'a [u8]>, DecodeError> {
        if self.tag(field)? { self.bytes().map(Some) } else { Ok(None) }
    }

    pub(crate) fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], DecodeError> {
        self.bytes()?.try_into().map_err(|_| DecodeError::Invalid(field))
    }

    pub(crate) fn string(&mut self, field: &'static str) -> Result<String, DecodeError> {
        let b = self.bytes()?;
        std::str::from_utf8(b).map(str::to_owned).map_err(|_| DecodeError::Invalid(field))
    }

    pub(crate) fn blob(&mut self) -> Result<SealedBlob, DecodeError> {
        self.bytes().map(|b| SealedBlob::from_bytes(b.to_vec()))
    }

    pub(crate) fn opt_blob(&mut self, field: &'static str) -> Result<Option<SealedBlob>, DecodeError> {
        Ok(self.opt_bytes(field)?.map(|b| SealedBlob::from_bytes(b.to_vec())))
    }

    pub(crate) fn strings(&mut self, field: &'static str) -> Result<Vec<String>, DecodeError> {
        let n = self.u64()?;
        // Each string takes at least 4 bytes, which bounds the allocation by the input.
        if n > (self.0.len() / 4) as u64 {
            return Err(DecodeError::Invalid(field));
        }
        (0..n).map(|_| self.string(field)).collect()
    }

    pub(crate) fn finish(self) -> Result<(), DecodeError> {
        if self.0.is_empty() { Ok(()) } else { Err(DecodeError::TrailingBytes) }
    }
}
