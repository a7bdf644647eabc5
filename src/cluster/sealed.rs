//! Values sealed with `[cluster] secret_key` (filled in by the credentials work).
