//! `client`: see the crate description.
