//! Request handlers, one module per resource. Each takes the extractor that
//! states its permission (`Session`, `OrgAccess<role::…>`) first.

use serde::Serialize;

pub mod api_keys;
pub mod auth;
pub mod endpoints;
pub mod invitations;
pub mod members;
pub mod ops;
pub mod orgs;
pub mod providers;
pub mod sessions;
pub mod ui;
pub mod usage;

/// `{"data":[…],"next_cursor":…}`.
#[derive(Serialize)]
pub struct List<T> {
    pub data: Vec<T>,
    pub next_cursor: Option<String>,
}

impl<T> List<T> {
    /// A list that is always complete (no pagination).
    pub fn all(data: Vec<T>) -> Self {
        Self {
            data,
            next_cursor: None,
        }
    }

    pub fn page(page: storage::page::Page<T>) -> Self {
        Self {
            data: page.data,
            next_cursor: page.next_cursor.map(|c| c.encode()),
        }
    }
}
