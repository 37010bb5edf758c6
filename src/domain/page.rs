//! A validated page request for ListProducts.

use super::ValidationError;

/// A 0-based page of `size` items; `offset()` stays within `MAX_OFFSET`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRequest {
    page: u32,
    size: u32,
}

impl PageRequest {
    pub const DEFAULT_SIZE: u32 = 20;
    pub const MAX_SIZE: u32 = 100;
    pub const MAX_OFFSET: u64 = 10_000_000;

    pub fn parse(page: i32, page_size: i32) -> Result<Self, ValidationError> {
        let size = match page_size {
            0 => Self::DEFAULT_SIZE,
            s if (1..=Self::MAX_SIZE as i32).contains(&s) => s as u32,
            _ => {
                return Err(ValidationError::new(
                    "page_size",
                    "must be between 0 (default 20) and 100",
                ));
            }
        };
        let Ok(page) = u32::try_from(page) else {
            return Err(ValidationError::new("page", "must be 0 or more"));
        };
        if u64::from(page) * u64::from(size) > Self::MAX_OFFSET {
            return Err(ValidationError::new(
                "page",
                "page * page_size must be at most 10000000",
            ));
        }
        Ok(Self { page, size })
    }

    pub fn page(&self) -> u32 {
        self.page
    }

    pub fn size(&self) -> u32 {
        self.size
    }

    /// Position of the page's first item in the category's order.
    pub fn offset(&self) -> u64 {
        u64::from(self.page) * u64::from(self.size)
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
}
