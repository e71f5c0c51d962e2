//! The OpAMP server (work in progress; see the README feature table).
