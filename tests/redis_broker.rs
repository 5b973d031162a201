//! Redis specifics.
