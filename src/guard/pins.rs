//! Pinned tool definitions: `servers.lock` (filled in by the pins work).
