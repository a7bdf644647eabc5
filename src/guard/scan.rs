//! Description scanning for instruction-like content (filled in by the pins work).
