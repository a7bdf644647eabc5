//! Secret detectors over results (filled in by the masking work).
