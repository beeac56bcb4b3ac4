//! `node-agent`: see the crate description.
