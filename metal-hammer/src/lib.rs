//! metal-hammer: the in-machine agent (being written).

pub mod install;
pub mod sys;
