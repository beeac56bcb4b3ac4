//! `attestor`: see the crate description.
