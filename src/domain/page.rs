//! A validated page request for ListProducts, and the cursor a page token carries.

use super::{ProductId, ValidationError};

/// Where a page starts and how many items it holds (1 to `MAX_SIZE`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageRequest {
    start: PageStart,
    size: u32,
}

/// Where a page starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PageStart {
    /// A position in the category's order: the `page` field times the page size.
    Position(u64),
    /// Right after the item a page token names.
    After(Cursor),
}

/// A place in a category's (name, id) order: right after `key`. When the list
/// was cached as `generation`, that place was `position`; while the cached list
/// is still that generation, the next page is read from the cache by position,
/// and otherwise from PostgreSQL with a keyset range scan after `key`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    /// 0 when the position is not known (the page came from PostgreSQL).
    pub generation: u64,
    pub position: u64,
    /// The (name, id) of the last item before the place; `None` only when every
    /// product of the page before was deleted while it was read.
    pub key: Option<(String, ProductId)>,
}

impl PageRequest {
    pub const DEFAULT_SIZE: u32 = 20;
    pub const MAX_SIZE: u32 = 100;
    pub const MAX_OFFSET: u64 = 10_000_000;

    /// A page by number (0-based). Deep pages are better walked with tokens.
    pub fn parse(page: i32, page_size: i32) -> Result<Self, ValidationError> {
        let size = parse_size(page_size)?;
        let Ok(page) = u32::try_from(page) else {
            return Err(ValidationError::new("page", "must be 0 or more"));
        };
        let offset = u64::from(page) * u64::from(size);
        if offset > Self::MAX_OFFSET {
            return Err(ValidationError::new(
                "page",
                "page * page_size must be at most 10000000; use page_token to walk further",
            ));
        }
        Ok(Self {
            start: PageStart::Position(offset),
            size,
        })
    }

    /// The page after `cursor` (from a page token).
    pub fn after(cursor: Cursor, page_size: i32) -> Result<Self, ValidationError> {
        Ok(Self {
            start: PageStart::After(cursor),
            size: parse_size(page_size)?,
        })
    }

    pub fn start(&self) -> &PageStart {
        &self.start
    }

    pub fn size(&self) -> u32 {
        self.size
    }
}

fn parse_size(page_size: i32) -> Result<u32, ValidationError> {
    match page_size {
        0 => Ok(PageRequest::DEFAULT_SIZE),
        s if (1..=PageRequest::MAX_SIZE as i32).contains(&s) => Ok(s as u32),
        _ => Err(ValidationError::new(
            "page_size",
            "must be between 0 (default 20) and 100",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_size_means_default() {
        assert_eq!(PageRequest::parse(0, 0).unwrap().size(), 20);
    }

    #[test]
    fn bounds_are_enforced() {
        assert_eq!(PageRequest::parse(0, 101).unwrap_err().field, "page_size");
        assert_eq!(PageRequest::parse(0, -1).unwrap_err().field, "page_size");
        assert_eq!(PageRequest::parse(-1, 10).unwrap_err().field, "page");
        assert!(PageRequest::parse(100_000, 100).is_ok());
        assert_eq!(PageRequest::parse(100_001, 100).unwrap_err().field, "page");
        assert_eq!(PageRequest::parse(i32::MAX, 100).unwrap_err().field, "page");
    }

    #[test]
    fn a_page_number_is_a_position() {
        assert_eq!(PageRequest::parse(3, 25).unwrap().start(), &PageStart::Position(75));
    }
}
