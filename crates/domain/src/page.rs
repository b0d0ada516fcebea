//! Keyset pagination over (created_at, id), newest first.

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use chrono::{DateTime, Utc};
use uuid::Uuid;

/// Position after which the next page starts; opaque to clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    pub at: DateTime<Utc>,
    pub id: Uuid,
}

impl Cursor {
    pub fn encode(&self) -> String {
        B64.encode(format!("{}|{}", self.at.timestamp_micros(), self.id))
    }

    /// `None` for anything that is not a cursor this server made.
    pub fn decode(s: &str) -> Option<Self> {
        let raw = String::from_utf8(B64.decode(s).ok()?).ok()?;
        let (micros, id) = raw.split_once('|')?;
        let micros: i64 = micros.parse().ok()?;
        // Years 1..9999 only: PostgreSQL refuses some times chrono accepts.
        if !(-62_135_596_800_000_000..=253_402_300_799_000_000).contains(&micros) {
            return None;
        }
        Some(Self {
            at: DateTime::from_timestamp_micros(micros)?,
            id: id.parse().ok()?,
        })
    }
}

/// One page of a list and the cursor of the next one.
#[derive(Debug, Clone)]
pub struct Page<T> {
    pub data: Vec<T>,
    pub next_cursor: Option<Cursor>,
}

impl<T> Page<T> {
    /// `rows` was fetched with `limit + 1` to learn whether more follow.
    pub fn from_rows(mut rows: Vec<T>, limit: u32, cursor_of: impl Fn(&T) -> Cursor) -> Self {
        let more = rows.len() > limit as usize;
        rows.truncate(limit as usize);
        let next_cursor = if more {
            rows.last().map(cursor_of)
        } else {
            None
        };
        Self {
            data: rows,
            next_cursor,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_round_trips_and_rejects_garbage() {
        let c = Cursor {
            at: DateTime::from_timestamp_micros(1_700_000_000_123_456).unwrap(),
            id: Uuid::new_v4(),
        };
        assert_eq!(Cursor::decode(&c.encode()), Some(c));
        let far = B64.encode(format!("{}|{}", i64::MAX / 2, Uuid::new_v4()));
        for bad in ["", "!!", "bm90IGEgY3Vyc29y", &B64.encode("1|notuuid"), &far] {
            assert_eq!(Cursor::decode(bad), None);
        }
    }
}
