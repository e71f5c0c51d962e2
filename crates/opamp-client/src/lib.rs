//! The OpAMP client (work in progress; see the README feature table).
