//! `allocator`: see the crate description.
